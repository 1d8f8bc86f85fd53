"""Data-stage throughput: is data ever the bottleneck of training?

Prints tokenization throughput (MB/s, all cores) on the standard-library corpus and loader
throughput (batches/s) at the `cpu` preset's batch shape, medians of several runs, then one JSON line
with `tokenize_mb_per_s` and `loader_batches_per_s`.

    .venv/bin/python benchmarks/data.py [--repeats 3] [--batches 2000]
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# This folder holds kernels.py: run as a script, it would shadow the `kernels` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from pipeline.build import collect_documents  # noqa: E402
from pipeline.config import resolve_config, token_loader  # noqa: E402
from pipeline.data import build_data, split_documents  # noqa: E402
from pipeline.shards import encode_documents, token_dtype  # noqa: E402
from pipeline.tokenizer import eot_id  # noqa: E402

PRESET = Path(__file__).resolve().parents[1] / "sweeps" / "configs" / "cpu.yaml"
STDLIB_ONLY = ["data.sources=[python:stdlib]", "data.mix=null"]  # the preset mixes in idioms
# METHOD.md 8: the fastest measured CPU training run (2L d64, dense) processes ~31k tokens/s.
FASTEST_TRAINING_TOKENS_PER_S = 31_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=2000)
    args = parser.parse_args()
    cfg = resolve_config(PRESET, STDLIB_ONLY)  # the figures in README.md are on the stdlib alone
    dataset = build_data(cfg.data, progress=False).dataset
    print(f"dataset: {dataset.folder}")
    mb_per_s = tokenize_throughput(cfg, dataset, args.repeats)
    batches_per_s = loader_throughput(cfg, dataset, args.repeats, args.batches)
    tokens_per_s = batches_per_s * cfg.train.batch_size * cfg.model.context_length
    print(f"loader supplies {tokens_per_s / FASTEST_TRAINING_TOKENS_PER_S:.0f}x the tokens/s of the fastest "
          f"measured CPU training run ({FASTEST_TRAINING_TOKENS_PER_S} tok/s)")
    print(json.dumps({"tokenize_mb_per_s": round(mb_per_s, 2), "loader_batches_per_s": round(batches_per_s, 1)}))


def tokenize_throughput(cfg, dataset, repeats: int) -> float:
    corpus = collect_documents(cfg.data.sources, exclude=cfg.data.exclude, text_column=cfg.data.text_column,
                               progress=False)
    texts = [d.text for d in split_documents(corpus.documents, cfg.data.val_fraction)["train"]]
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    tokenizer = dataset.tokenizer()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        encode_documents(tokenizer, texts, eot=eot_id(tokenizer), dtype=token_dtype(cfg.data.vocab_size),
                         desc="", progress=False)
        rates.append(megabytes / (time.perf_counter() - start))
    print(f"tokenize: {megabytes:.1f} MB on {os.cpu_count()} cores, MB/s per run "
          f"{', '.join(f'{r:.2f}' for r in rates)}; median {statistics.median(rates):.2f}")
    return statistics.median(rates)


def loader_throughput(cfg, dataset, repeats: int, batches: int) -> float:
    loader = token_loader(cfg, dataset, "train")  # the training stage's loader: batch size, context, seed
    rates = []
    for run in range(repeats):
        start = time.perf_counter()
        for step in range(run * batches, (run + 1) * batches):
            loader.batch(step)
        rates.append(batches / (time.perf_counter() - start))
    print(f"loader: batch {cfg.train.batch_size} x {cfg.model.context_length + 1} tokens, batches/s per run "
          f"{', '.join(f'{r:.0f}' for r in rates)}; median {statistics.median(rates):.0f}")
    return statistics.median(rates)


if __name__ == "__main__":
    main()
