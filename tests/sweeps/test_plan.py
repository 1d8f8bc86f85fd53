"""`circuitscale plan`: a study's FLOPs, memory per rank, GPU-hours and cost, before anything runs (no
training, no Ray). The model-level counts it prices are tested in tests/pipeline/test_cost.py."""

import dataclasses
import json
import math
from pathlib import Path

import pytest

from cli.main import main
from model.config import param_counts
from pipeline.config import resolve_config
from pipeline.cost import count_params, memory_per_rank
from sweeps import lr_search
from sweeps.plan import (
    GPUS,
    HEADROOM,
    GpuSpec,
    fit_gpus,
    gpu_counts,
    lr_search_steps,
    pack_nodes,
    plan_study,
    summary,
)
from sweeps.spec import load_study

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.d_model=64", "model.num_layers=2", "model.context_length=32", "data.vocab_size=300"]
BASE = """model: {d_model: 64, num_layers: 2, context_length: 32}
data: {vocab_size: 300}
train: {steps: 10, batch_size: 4, grad_accum: 2}
"""
STUDY = """name: tiny
base: base.yaml
workers: 2
gpus_per_worker: 1
grid:
  sparsity.density: [1.0, 0.25]
points:
  - {model.d_model: 128, sparsity.density: 0.0625, sparsity.embedding_density: 0.125, train.steps: 12}
"""


def write(tmp_path, text=STUDY):
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "study.yaml").write_text(text)
    return tmp_path / "study.yaml"


def test_flops_are_6NT_with_the_per_worker_batch(tmp_path):
    plan = plan_study(write(tmp_path), gpu="a100", mfu="0.5", price="2")
    assert [t.spec.config.sparsity.density for t in plan.trials] == [1.0, 0.25, 0.0625]
    for t in plan.trials:
        cfg = t.spec.config
        tokens = cfg.train.steps * 4 * 2 * 32 * 2  # steps x batch_size x grad_accum x context x workers
        assert t.tokens == tokens
        assert t.flops == 6 * param_counts(cfg.model, 300)["total"] * tokens
        assert t.flops_nonzero == 6 * t.counts.nonzero * tokens
        assert t.engine == "deepspeed" and t.precision == "fp32"  # two workers; precision fp32 by default
        assert t.gpu_hours == pytest.approx(t.flops / (19.5e12 * 0.5) / 3600)
        assert t.cost_usd == pytest.approx(2 * t.gpu_hours)
    dense, sparse = plan.trials[0], plan.trials[1]
    assert sparse.flops == dense.flops and sparse.flops_nonzero < dense.flops_nonzero  # masked dense kernels


def test_the_sweep_total_is_the_sum_of_its_trials_and_lr_search(tmp_path):
    text = STUDY + "lr_search: {lrs: [0.001, 0.003, 0.01, 0.03], budget: 0.25, eta: 2}\n"
    plan = plan_study(write(tmp_path, text), gpu="h100")
    figures = summary(plan)
    assert len(plan.lr_search) == 3 and figures["lr_search_runs"] == sum(s.runs for s in plan.lr_search) > 3
    runs = [*plan.trials, *plan.lr_search]
    assert figures["trial_flops"] == sum(t.flops for t in plan.trials)
    assert figures["flops"] == pytest.approx(figures["trial_flops"] + figures["lr_search_flops"])
    assert figures["gpu_hours"] == pytest.approx(sum(r.gpu_hours for r in runs), abs=0.01)
    assert figures["cost_usd"] == pytest.approx(sum(r.cost_usd for r in runs), abs=0.01)
    assert figures["mfu_assumed"] and figures["price_assumed"]
    assert figures["price_usd_per_gpu_hour"] == GPUS["h100"].price_usd


@pytest.mark.parametrize(("lrs", "budget", "eta"), [([1e-3, 3e-3, 1e-2, 3e-2, 1e-1], 0.125, 3),
                                                    ([1e-3, 3e-3, 1e-2, 3e-2], 0.25, 2), ([1e-3, 1e-2], 0.5, 2)])
def test_lr_search_runs_are_the_searchs_own(tmp_path, monkeypatch, lrs, budget, eta):
    """The planner's rungs against sweeps/lr_search.py's, run with a fake fit (no training)."""
    # a one-step point has one rate left after its first rung, yet reruns while the other points search on
    text = STUDY + f"  - {{train.steps: 1}}\nlr_search: {{lrs: {lrs}, budget: {budget}, eta: {eta}}}\n"
    study, specs = load_study(write(tmp_path, text))
    monkeypatch.setattr(lr_search, "_final_val_loss",  # a loss per rate: the search keeps rates near 1e-2
                        lambda run_dir: abs(math.log(float(run_dir.name.split("-lr=")[1].split("-")[0]) / 1e-2)))
    folder = tmp_path / "folder"
    folder.mkdir()  # the study folder, made by the study before its search
    chosen = lr_search.search_lrs(study, {s.name: (s, s.config) for s in specs}, folder,
                                  lambda configs, name: (set(configs), {}), log=lambda _: None)
    points = {s.point_name: s.config.train.steps for s in specs}
    planned = lr_search_steps(study, points)
    assert set(planned) == set(chosen)
    for name, runs in planned.items():
        searched = [(rung["steps"], len(rung["val_loss"])) for rung in chosen[name]["rungs"]]
        assert sorted(runs) == sorted(steps for steps, count in searched for _ in range(count))
    rungs = len(chosen["000-density=1.0"]["rungs"])  # the one-step point: every rate, then one run per rung
    assert len(chosen["003-steps=1"]["rungs"]) == rungs and len(planned["003-steps=1"]) == len(lrs) + rungs - 1


def test_right_sizing_picks_the_fewest_gpus_that_fit():
    assert gpu_counts(8) == [1, 2, 4, 8] and gpu_counts(6) == [1, 2, 6] and gpu_counts(1) == [1]
    cfg = resolve_config(None, TINY + ["sparsity.density=0.25", "deepspeed.zero_stage=3", "train.batch_size=1"])
    counts = count_params(cfg)
    assert fit_gpus(cfg, counts, 8, "deepspeed", GPUS["h100"]) == 1
    at = {g: memory_per_rank(cfg, counts, g, "deepspeed").total for g in (2, 4)}
    card = GpuSpec(name="small", peak_flops={"fp32": 1.0}, memory_bytes=(at[2] + at[4]) / 2 / HEADROOM, price_usd=1.0)
    assert fit_gpus(cfg, counts, 8, "deepspeed", card) == 4
    tiny = dataclasses.replace(card, memory_bytes=1.0)
    assert fit_gpus(cfg, counts, 8, "deepspeed", tiny) is None
    assert pack_nodes([1] * 9) == 2 and pack_nodes([4, 4, 2, 2, 1]) == 2 and pack_nodes([16, 1]) == 3


def test_cli_prints_a_table_then_the_json_line(tmp_path, capsys):
    path = write(tmp_path)
    assert main(["plan", str(path), "--gpu", "a100", "--price", "2", "--mfu", "0.5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert {"flops", "gpu_hours", "cost_usd", "flops_nonzero", "tokens", "trials"} <= set(figures)
    assert figures["trials"] == 3 and not figures["mfu_assumed"] and not figures["price_assumed"]
    assert lines[1].split()[:3] == ["#", "d_model", "density"] and "GPU-hours" in "\n".join(lines)
    # (as for `study`, the overrides follow SWEEP.yaml directly; the flags go before or after both)
    assert main(["plan", str(path), "train.batch_size=8", "--gpu", "a100", "--price", "2", "--mfu", "0.5"]) == 0
    doubled = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # overrides reach every trial
    assert doubled["flops"] == 2 * figures["flops"] and doubled["cost_usd"] == pytest.approx(2 * figures["cost_usd"])


@pytest.mark.parametrize(("args", "fragment"), [
    (["--gpu", "v100"], "--gpu must be one of a100, h100"),
    (["--price", "0"], "--price must be a positive number"),
    (["--price", "-3"], "--price must be a positive number"),
    (["--price", "cheap"], "--price must be a positive number"),
    (["--mfu", "1.5"], "--mfu is a fraction"),
    (["--mfu", "nan"], "--mfu must be a positive number"),
    (["train.steps"], "overrides must be KEY=VALUE"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, args, fragment):
    assert main(["plan", str(write(tmp_path)), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err and err.startswith("circuitscale: error:")


def test_a_missing_study_file_exits_2(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and "\n" not in err


def test_paper_study_plan(capsys):
    assert main(["plan", str(ROOT / "sweeps" / "paper.yaml"), "--gpu", "h100"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert figures["trials"] == 56 and figures["gpus_per_trial"] == 8
    assert figures["flops"] > figures["trial_flops"] > 0 and figures["lr_search_flops"] > 0
    assert figures["gpu_hours"] > 0 and figures["cost_usd"] > 0 and figures["max_memory_per_rank_gb"] > 0
    # every trial trains bf16 under DeepSpeed: the GPU-hours are the FLOPs at the H100's bf16 peak and MFU
    assert figures["gpu_hours"] == pytest.approx(figures["flops"] / (989e12 * figures["mfu"]) / 3600, abs=0.01)
    # an ef 1 model does not need a whole node
    assert figures["right_sized_gpus"] < 56 * 8 and figures["right_sized_nodes"] < 56
    # the corpus build, once: a TB at the measured MB/s per core on 4 trials x 8 workers x 4 CPUs
    assert figures["data_cpus"] == 128
    assert figures["data_hours_per_tb"] == pytest.approx(1e6 / (0.85 * 128) / 3600, abs=0.01)
    assert any(line.startswith("  data preparation") and "h per TB" in line for line in lines)


def test_the_plan_says_what_the_l0_step_would_take(tmp_path, capsys):
    """No GPU crossover is measured: the GPU-hours stay the exact recipe's, and the plan says how much of the
    trials' FLOPs sits at or below the CPU's crossover (1/32): here the 1/16 point is above it, 1/64 below."""
    text = STUDY.replace("sparsity.density: 0.0625", "sparsity.density: 0.015625, sparsity.neuron_floor: 2")
    plan = plan_study(write(tmp_path, text), gpu="h100")
    figures = summary(plan)
    below = [t for t in plan.trials if t.spec.config.sparsity.density == 0.015625]
    assert figures["l0_gpu_crossover"] is None
    assert figures["trial_flops_below_cpu_crossover"] == pytest.approx(
        sum(t.flops for t in below) / sum(t.flops for t in plan.trials), abs=1e-4)
    assert 0 < figures["trial_flops_below_cpu_crossover"] < 1
    assert main(["plan", str(write(tmp_path, text)), "--gpu", "h100"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "L0-following" in x)
    assert "1 of 3 trials" in line and "no GPU crossover" in line
