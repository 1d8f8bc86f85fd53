"""What a data build costs: wall time, peak memory and tokens/s per core, local engine vs Ray Data.

Runs `circuitscale data` as a child process per (corpus, engine), each into a fresh cache, samples the
resident memory of the child and every process it starts (Ray's own daemons included for `ray`) every
0.1 s, and checks that both engines wrote byte-identical datasets (manifest, tokenizer, shards). Corpora:
`stdlib` (the default, ~31 MB) and `large` (the stdlib plus every `.py` file under this virtualenv's
site-packages, ~11x); `--sample-mb` sets `data.tokenizer_sample_mb` (what BPE holds in memory). Prints one
line per build, then one JSON line.

    .venv/bin/python benchmarks/data_build.py [--corpora stdlib large] [--engines local ray] [--repeats 1]
"""

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import psutil

CORPORA = {
    "stdlib": ["data.sources=[python:stdlib]", "data.mix=null"],
    "large": [f"data.sources=[python:stdlib,'{sysconfig.get_paths()['purelib']}/**/*.py']", "data.mix=null"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    parser.add_argument("--engines", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    parser.add_argument("--repeats", type=int, default=1, help="builds per (corpus, engine); medians printed")
    parser.add_argument("--sample-mb", type=float, default=200.0, help="data.tokenizer_sample_mb")
    parser.add_argument("--bucket-mb", type=float, default=64.0, help="data.bucket_mb")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    rows = []
    for corpus in args.corpora:
        outputs = {}
        for engine in args.engines:
            runs = []
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory(prefix="data-build-") as cache:
                    overrides = [*CORPORA[corpus], f"data.cache_dir={cache}", f"data.engine={engine}",
                                 f"data.tokenizer_sample_mb={args.sample_mb}", f"data.bucket_mb={args.bucket_mb}"]
                    seconds, peak_tree, peak_one = measure(overrides)
                    folder = next(p for p in Path(cache).iterdir() if (p / "manifest.json").is_file())
                    manifest = json.loads((folder / "manifest.json").read_text())
                    outputs[engine] = fingerprint(folder)
                    runs.append((seconds, peak_tree, peak_one, manifest))
            seconds = statistics.median(r[0] for r in runs)
            manifest = runs[0][3]
            tokens = sum(s["tokens"] for s in manifest["splits"].values())
            mb = sum(s["bytes"] for s in manifest["splits"].values()) / 1e6
            row = {"corpus": corpus, "engine": engine, "mb": round(mb, 1), "tokens": tokens,
                   "seconds": round(seconds, 1), "peak_rss_gb": round(max(r[1] for r in runs) / 1e9, 2),
                   "peak_process_rss_gb": round(max(r[2] for r in runs) / 1e9, 2),
                   "tokens_per_s_per_core": round(tokens / seconds / cores)}
            rows.append(row)
            print(f"{corpus:6s} {engine:5s}: {mb:7.1f} MB {tokens / 1e6:7.2f}M tokens  {seconds:7.1f} s  "
                  f"peak RSS {row['peak_rss_gb']:.2f} GB (largest process {row['peak_process_rss_gb']:.2f} GB)  "
                  f"{row['tokens_per_s_per_core'] / 1e3:.0f}k tokens/s/core ({cores} cores)", flush=True)
        if len(outputs) > 1:
            same = len(set(outputs.values())) == 1
            print(f"{corpus}: engines {' and '.join(outputs)} wrote {'identical' if same else 'DIFFERENT'} datasets")
            for row in rows:
                if row["corpus"] == corpus:
                    row["identical"] = same
    print(json.dumps(rows))


def measure(overrides: list[str]) -> tuple[float, int, int]:
    """Wall seconds, peak summed RSS of the process tree, peak RSS of its largest process."""
    cmd = [sys.executable, "-m", "cli.main", "data", "--no-progress", *overrides]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    peak_tree = peak_one = 0
    while proc.poll() is None:
        try:
            sizes = [p.memory_info().rss for p in [root, *root.children(recursive=True)]]
        except psutil.Error:
            sizes = []
        peak_tree, peak_one = max(peak_tree, sum(sizes)), max([peak_one, *sizes])
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    out = proc.stdout.read()
    if proc.returncode != 0:
        sys.exit(f"build failed ({' '.join(overrides)}):\n{out[-3000:]}")
    return seconds, peak_tree, peak_one


def fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name not in ("build.json", "config.yaml"):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


if __name__ == "__main__":
    main()
