"""Does the `idioms` corpus let CPU-scale sparse models learn the tasks? (issue: simple-idioms corpus)

With the `cpu` preset (4 layers, d_model 128, context 128, 600 steps of 4096 tokens), dense and
density 1/16, over several seeds: train on the standard library alone, and on the standard library
mixed with generated idioms by bytes (`--mix` is the idioms share), each through the training loop
(`pipeline.train.train`; no MLflow, so it also runs on a bare GPU machine with `--device cuda`). Report
per-task accuracy (held-out task pairs), how many context tasks are learned (mean accuracy over seeds
> 0.8; else_elif is left out: bigram statistics alone solve it), and validation loss per byte on
held-out real code (the stdlib files the content-hash split holds out; the same files for both
tokenizers) and on freshly generated idioms (a seed no training run used). Losses are compared per
byte, never per token: the two corpora have different tokenizers. Equal steps = equal tokens.

    .venv/bin/python benchmarks/corpus_mix.py [--seeds 3] [--mix 0.5] [--steps 600]

Final JSON line: sparse_tasks_learned_stdlib, sparse_tasks_learned_mix, real_code_nats_per_byte_stdlib,
real_code_nats_per_byte_mix (the sparse models'), and the dense models' figures beside them.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# This folder holds kernels.py: run as a script, it would shadow the `kernels` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from infra.tracking import NullTracker  # noqa: E402
from model.gpt import GPT  # noqa: E402
from pipeline.build import collect_documents  # noqa: E402
from pipeline.config import resolve_config  # noqa: E402
from pipeline.corpus import STDLIB_SOURCE  # noqa: E402
from pipeline.data import build_data, split_documents  # noqa: E402
from pipeline.evaluate import task_metrics  # noqa: E402
from pipeline.idioms import generate  # noqa: E402
from pipeline.tokenizer import eot_id  # noqa: E402
from pipeline.train import train  # noqa: E402
from pipeline.trial import build_training  # noqa: E402

PRESET = Path(__file__).resolve().parents[1] / "sweeps" / "configs" / "cpu.yaml"
HELD_OUT_IDIOMS_SEED = 10_000  # no training corpus uses it
EVAL_TOKENS = 150_000


@torch.no_grad()
def nats_per_byte(model: GPT, tokenizer, texts: list[str], context: int) -> float:
    """Next-token loss over the texts (joined by end-of-text), per UTF-8 byte of the predicted text."""
    eot = eot_id(tokenizer)
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text).ids + [eot]
        if len(ids) >= EVAL_TOKENS:
            break
    ids = ids[:EVAL_TOKENS]
    width = context + 1
    windows = torch.tensor(ids[: len(ids) // width * width]).view(-1, width)
    nll, predicted = 0.0, []
    device = next(model.parameters()).device
    for batch in windows.split(32):
        batch = batch.to(device)
        logits = model(batch[:, :-1])
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                               reduction="sum").item()
        predicted += batch[:, 1:].reshape(-1).tolist()
    size = {i: len(tokenizer.decode([i]).encode("utf-8")) for i in set(predicted)}
    return nll / sum(size[i] for i in predicted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--mix", type=float, default=0.5, help="idioms share of the mixed corpus, by bytes")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.0625])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    corpora = {
        "stdlib": ["data.sources=[python:stdlib]", "data.mix=null"],
        "mix": ["data.sources=[python:stdlib,idioms]",
                f"data.mix={{python:stdlib: {1 - args.mix}, idioms: {args.mix}}}"],
    }
    stdlib = collect_documents([STDLIB_SOURCE], exclude=[], text_column="text", progress=False)
    real_val = [d.text for d in split_documents(stdlib.documents, 0.05)["val"]]  # held out in both corpora
    idioms_val = list(generate(HELD_OUT_IDIOMS_SEED, 600_000))
    results: dict[tuple[str, float], list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for corpus, extra in corpora.items():
            cfg = resolve_config(PRESET, extra)
            dataset = build_data(cfg.data, progress=False).dataset
            tokenizer = dataset.tokenizer()
            print(f"{corpus}: {json.dumps(dataset.manifest.get('bytes_per_source', {}))} bytes; "
                  f"{dataset.manifest['splits']['train']['tokens']:,} train tokens", flush=True)
            for density in args.densities:
                for seed in range(args.seeds):
                    tick = time.perf_counter()
                    run = Path(scratch) / f"{corpus}-{density}-{seed}"
                    cfg = resolve_config(PRESET, [*extra, f"train.run_dir={run}", f"train.seed={seed}",
                                                  f"train.steps={args.steps}", f"sparsity.density={density}"])
                    result = train(build_training(cfg, dataset, args.device), cfg.train, cfg.sparsity, run,
                                   NullTracker(), checkpoint_meta={}, device=args.device, progress=False,
                                   log=lambda _: None)
                    model = GPT(cfg.model, tokenizer.get_vocab_size(), device=args.device)
                    model.load_state_dict({k[len("model/"):]: v for k, v in result.state.items()
                                           if k.startswith("model/")})
                    model.eval()
                    scores = task_metrics(model, tokenizer, [], device=args.device, log=lambda _: None)
                    row = {
                        "tasks": {k.split("/")[1]: v for k, v in scores.items() if k.endswith("/accuracy")},
                        "real": nats_per_byte(model, tokenizer, real_val, cfg.model.context_length),
                        "idioms": nats_per_byte(model, tokenizer, idioms_val, cfg.model.context_length),
                        "seconds": time.perf_counter() - tick,
                    }
                    results.setdefault((corpus, density), []).append(row)
                    row["val_loss"] = result.final["val_loss"]
                    print(f"  {corpus:6s} density {density:<7g} seed {seed}: real code {row['real']:.4f} "
                          f"nats/byte, idioms {row['idioms']:.4f}, mean task accuracy "
                          f"{statistics.mean(row['tasks'].values()):.3f}, {row['seconds']:.0f} s", flush=True)
    summary = {}
    tasks = sorted(next(iter(results.values()))[0]["tasks"])
    print(f"\nmean accuracy over {args.seeds} seeds (context tasks; learned = above 0.8):")
    print(f"  {'task':28s}" + "".join(f" {c}/{d:g}".rjust(14) for c, d in results))
    for task in tasks:
        cells = [statistics.mean(r["tasks"][task] for r in rows) for rows in results.values()]
        print(f"  {task:28s}" + "".join(f"{v:14.3f}" for v in cells))
    for (corpus, density), rows in results.items():
        kind = "dense" if density >= 1.0 else "sparse"
        learned = [t for t in tasks if t != "else_elif" and statistics.mean(r["tasks"][t] for r in rows) > 0.8]
        summary[f"{kind}_tasks_learned_{corpus}"] = len(learned)
        summary[f"{kind}_learned_{corpus}"] = learned
        summary[f"{'real_code' if kind == 'sparse' else 'dense_real_code'}_nats_per_byte_{corpus}"] = round(
            statistics.median(r["real"] for r in rows), 4)
        summary[f"{kind}_idioms_nats_per_byte_{corpus}"] = round(statistics.median(r["idioms"] for r in rows), 4)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
