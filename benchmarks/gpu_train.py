"""A short training run on the standard-library corpus with the dispatched kernels (Triton on a GPU):
dense and one sparse density side by side, printing loss, validation loss and tokens/s.

    python benchmarks/gpu_train.py [--steps 300] [--density 0.0625] [--d-model 256]
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

# This folder holds kernels.py: run as a script, it would shadow the `kernels` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from model.config import ModelConfig, SparsityConfig  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.sparsity import sparse_tensors  # noqa: E402
from pipeline.config import TrainConfig  # noqa: E402
from pipeline.data import DataConfig, build_data  # noqa: E402
from pipeline.evaluate import lm_loss  # noqa: E402
from pipeline.loader import TokenLoader  # noqa: E402
from pipeline.train import make_engine, train_step  # noqa: E402


def run(dataset, model_cfg, density: float, steps: int, batch: int, device: str) -> dict:
    torch.manual_seed(0)
    model = GPT(model_cfg, dataset.manifest["tokenizer"]["vocab_size"], device=device)
    sparsity = SparsityConfig(density=density)
    train = TrainConfig(steps=steps, batch_size=batch, lr=1e-2 if density < 1 else 3e-3)
    tensors = sparse_tensors(model, sparsity)
    engine = make_engine(model, tensors, train, sparsity)
    loader = TokenLoader(dataset, split="train", batch_size=batch, context_length=model_cfg.context_length)
    val = TokenLoader(dataset, split="val", batch_size=batch, context_length=model_cfg.context_length, shuffle=False)
    if device == "cuda":
        torch.cuda.synchronize()
    start, first = time.perf_counter(), None
    for step in range(steps):
        stats = train_step(engine, [loader.batch(step).to(device)], step, train, sparsity)
        first = first if first is not None else stats["loss"]
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        val_loss = sum(lm_loss(model, val.batch(i).to(device)).item() for i in range(10)) / 10
    return {"density": density, "first_loss": round(first, 3), "last_loss": round(stats["loss"], 3),
            "val_loss": round(val_loss, 3), "tokens_per_s": round(steps * batch * model_cfg.context_length / seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--density", type=float, default=1 / 16)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cache", default="/tmp/circuitscale-data")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dataset = build_data(DataConfig(cache_dir=args.cache), progress=False).dataset
    model_cfg = dataclasses.replace(ModelConfig(), d_model=args.d_model, num_layers=4, context_length=128)
    print(f"device {device}; data {dataset.folder}; model {model_cfg}")
    results = [run(dataset, model_cfg, d, args.steps, args.batch, device) for d in (1.0, args.density)]
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
