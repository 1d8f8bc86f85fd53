"""Trial figures on the `cpu` preset: tokens/s dense vs sparse on 1 and 2 workers, peak memory per
rank with ZeRO 0 vs ZeRO 2 at 2 workers, and the validation loss the preset's budget reaches (dense
and density 1/16) next to a count-based bigram model on the same split.

Each trial runs through `run_trial` in a scratch folder. Ends with one JSON line carrying
`tokens_per_s_dense`, `tokens_per_s_sparse`, `peak_rss_mb_zero0`, `peak_rss_mb_zero2` (1-worker
throughput; rank-0 peak RSS) and the losses.

    .venv/bin/python benchmarks/trial.py [--throughput-steps 40] [--skip-budget]
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

# This folder holds kernels.py: run as a script, it would shadow the `kernels` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402

from pipeline.config import resolve_config  # noqa: E402
from pipeline.data import Dataset, build_data  # noqa: E402
from pipeline.shards import map_shard  # noqa: E402
from pipeline.trial import run_trial  # noqa: E402

PRESET = Path(__file__).resolve().parents[1] / "sweeps" / "configs" / "cpu.yaml"
STDLIB_ONLY = ["data.sources=[python:stdlib]", "data.mix=null"]  # the preset mixes in idioms


def trial(scratch: Path, name: str, *overrides: str) -> tuple[dict, list[dict]]:
    cfg = resolve_config(PRESET, [*STDLIB_ONLY, f"train.run_dir={scratch / name}", *overrides])
    result = run_trial(cfg, progress=False, log=lambda _: None)
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return result.final, lines


def throughput(lines: list[dict]) -> float:
    rates = [x["tokens_per_s"] for x in lines if "tokens_per_s" in x and "val_loss" not in x]
    return statistics.median(rates[5:])  # past the warm-up steps


def bigram_val_loss(dataset: Dataset, k: float = 0.1) -> float:
    """Add-k smoothed count bigram model: fit on train shards, cross-entropy on validation shards."""
    vocab = dataset.manifest["tokenizer"]["vocab_size"]
    counts = np.zeros((vocab, vocab), dtype=np.float64)
    for entry in dataset.shards("train"):
        tokens = map_shard(dataset.folder / entry["file"]).astype(np.int64)
        counts += np.bincount(tokens[:-1] * vocab + tokens[1:], minlength=vocab * vocab).reshape(vocab, vocab)
    probs = (counts + k) / (counts + k).sum(axis=1, keepdims=True)
    losses = []
    for entry in dataset.shards("val"):
        tokens = map_shard(dataset.folder / entry["file"]).astype(np.int64)
        losses.append(-np.log(probs[tokens[:-1], tokens[1:]]))
    return float(np.concatenate(losses).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--throughput-steps", type=int, default=40)
    parser.add_argument("--skip-budget", action="store_true", help="skip the two full-budget training runs")
    args = parser.parse_args()
    base = resolve_config(PRESET)
    dataset = build_data(base.data, progress=False).dataset
    short = [f"train.steps={args.throughput_steps}", f"train.eval_every={args.throughput_steps}",
             f"train.checkpoint_every={args.throughput_steps}"]
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for workers in (1, 2):
            for label, density in (("dense", 1.0), ("sparse", 1 / 16)):
                final, lines = trial(scratch, f"tp-{workers}-{label}", *short, f"sparsity.density={density}",
                                     f"trial.workers={workers}", "deepspeed.zero_stage=2")
                rate = throughput(lines)
                figures[f"tokens_per_s_{label}{'' if workers == 1 else '_2w'}"] = rate
                print(f"throughput  {workers} worker(s)  {label:6s}: {rate:8.0f} tokens/s (median of steps 6..)")
        for stage in (0, 2):
            final, _ = trial(scratch, f"mem-{stage}", *short, "trial.workers=2", f"deepspeed.zero_stage={stage}",
                             "sparsity.density=0.0625")
            figures[f"peak_rss_mb_zero{stage}"] = final["peak_rss_mb"]
            print(f"memory      2 workers  ZeRO {stage}: rank-0 peak RSS {final['peak_rss_mb']:.0f} MB")
        bigram = bigram_val_loss(dataset)
        figures["bigram_val_loss"] = bigram
        print(f"count bigram model (add-0.1): validation loss {bigram:.3f}")
        if not args.skip_budget:
            for label, density in (("dense", 1.0), ("sparse", 1 / 16)):
                final, _ = trial(scratch, f"budget-{label}", f"sparsity.density={density}")
                figures[f"val_loss_{label}"] = final["val_loss"]
                print(f"budget ({base.train.steps} steps) {label:6s}: validation loss {final['val_loss']:.3f} "
                      f"({bigram - final['val_loss']:+.3f} nats below the bigram model)")
    print(json.dumps({k: round(v, 3) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
