"""The trial stage end to end on tiny configs: exact resume after SIGKILL, corrupt-checkpoint
fallback, run statuses in MLflow, and the exports."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from cli.main import main
from infra.checkpoint import list_checkpoints
from model.gpt import GPT
from model.graph import all_kept, kept_nodes
from model.sparsity import sparse_tensors
from pipeline.circuits import load_for_pruning
from pipeline.config import resolve_config
from pipeline.data import build_data
from pipeline.prune import calibrated_test_loss, circuit_loss
from pipeline.records import CircuitRecord
from pipeline.tasks import TASKS, encode_task
from pipeline.tokenizer import eot_id
from pipeline.train import NonFiniteLoss, make_engine, restore
from pipeline.trial import build_training, run_trial, trial_rank
from tests.killing import kill_after_checkpoints
from tests.reference_paper_gpt import paper_forward

SCRIPT = Path(sys.executable).parent / "circuitscale"


@pytest.fixture(scope="module")
def dataset_cache(small_dataset):
    return small_dataset.dataset.folder.parent


def tiny(dataset_cache, run_dir, *extra):
    """A small trial's overrides; `extra` replaces a default key (the CLI rejects a key set twice)."""
    args = dict(a.split("=", 1) for a in [
        f"data.sources=[{SMALL}]", f"data.cache_dir={dataset_cache}", "data.vocab_size=512", "data.val_fraction=0.2",
        "data.shard_tokens=20000", "model.d_model=64", "model.num_layers=2", "model.context_length=32",
        "train.batch_size=4", "train.steps=40", "train.eval_every=10", "train.checkpoint_every=5",
        "train.eval_batches=2", "sparsity.density=0.0625", f"train.run_dir={run_dir}", *extra,
    ])
    return [f"{k}={v}" for k, v in args.items()]


SMALL = None


@pytest.fixture(autouse=True)
def _small_corpus(small_corpus):
    global SMALL
    SMALL = small_corpus


def cli(args, **kw):
    return subprocess.Popen([str(SCRIPT), "train", "--no-progress", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def mlflow_run(run_dir: Path):
    record = json.loads((run_dir / "mlflow_run.json").read_text())
    return MlflowClient(tracking_uri=record["uri"]).get_run(record["run_id"])


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_then_rerun_is_bit_identical_to_an_uninterrupted_run(dataset_cache, tmp_path, workers):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    extra = [f"trial.workers={workers}", "train.steps=120"]  # long enough to be killed midway, even under load
    done = cli(tiny(dataset_cache, straight, *extra))
    out = done.communicate(timeout=300)[0]
    assert done.returncode == 0, out[-3000:]
    steps_done = kill_after_checkpoints(cli(tiny(dataset_cache, killed, *extra)), killed, timeout=240)
    assert steps_done < 120, "the run finished before it could be killed"
    time.sleep(1)  # spawned workers die with their parent (PR_SET_PDEATHSIG)
    rerun = cli(tiny(dataset_cache, killed, *extra))
    output = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, output
    assert f"resumed from step {steps_done}" in output
    a, b = load_file(str(straight / "export/model.safetensors")), load_file(str(killed / "export/model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    run = mlflow_run(killed)
    assert run.info.status == "FINISHED"  # the same MLflow run, continued
    assert len(MlflowClient(tracking_uri=json.loads((killed / "mlflow_run.json").read_text())["uri"])
               .search_runs([run.info.experiment_id])) == 1


def test_a_rank_given_the_built_dataset_never_reads_the_corpus(dataset_cache, tmp_path, monkeypatch):
    """What a study's ranks do: the driver built the data once (sweeps/study.py), each rank only opens its
    manifest, so a thousand ranks do not each read the whole corpus to find the cache."""
    import pipeline.data

    cfg = resolve_config(None, tiny(dataset_cache, tmp_path / "run", "train.steps=2", "train.checkpoint_every=2"))
    folder = build_data(cfg.data, progress=False).dataset.folder

    def refuse(*args, **kwargs):
        raise AssertionError("a rank read the corpus")

    monkeypatch.setattr(pipeline.data, "scan_corpus", refuse)
    final = trial_rank(cfg, data=folder, prune=False, log=lambda _: None)
    assert math.isfinite(final["val_loss"])


def test_corrupt_checkpoint_falls_back_to_the_previous_one(dataset_cache, tmp_path):
    cfg = resolve_config(None, tiny(dataset_cache, tmp_path / "run", "train.steps=10"))
    run_trial(cfg, progress=False, log=lambda _: None)
    checkpoints = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in checkpoints] == ["step-00000005", "step-00000010"]
    state = checkpoints[-1] / "state.safetensors"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated
    model = GPT(cfg.model, 512)
    engine = make_engine(model, sparse_tensors(model, cfg.sparsity), cfg.train, cfg.sparsity)
    messages = []
    assert restore(tmp_path / "run" / "checkpoints", engine, messages.append) == 5
    assert str(checkpoints[-1]) in messages[0] and "checksum" in messages[0]


def test_nan_loss_fails_the_run_at_once_with_its_reason(dataset_cache, tmp_path):
    proc = cli(tiny(dataset_cache, tmp_path / "run", "train.lr=1e38", "train.grad_rms=none"))
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, output
    assert "training failed: loss became" in output
    run = mlflow_run(tmp_path / "run")
    assert run.info.status == "FAILED"
    assert "loss became" in run.data.tags["failure_reason"]


@pytest.mark.slow
def test_nan_in_a_spawned_worker_fails_the_run_with_the_workers_own_exception(dataset_cache, tmp_path):
    cfg = resolve_config(None, tiny(dataset_cache, tmp_path / "run", "trial.workers=2", "train.lr=1e38",
                                    "train.grad_rms=none"))
    with pytest.raises(NonFiniteLoss, match="loss became"):  # the worker's exception type, not a message match
        run_trial(cfg, progress=False, log=lambda _: None)
    run = mlflow_run(tmp_path / "run")
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"].startswith("NonFiniteLoss: loss became")


def _drop_the_last_checkpoint(run_dir: Path) -> None:
    """Make a finished run look killed after its first checkpoint: the newest checkpoint and everything
    written after it go, so a rerun resumes from the one before."""
    shutil.rmtree(list_checkpoints(run_dir / "checkpoints")[-1])
    shutil.rmtree(run_dir / "export")
    for name in ("trial.json", "final_metrics.json"):
        (run_dir / name).unlink()


@pytest.mark.slow
def test_zero3_resume_is_bit_identical(dataset_cache, tmp_path):
    run_dir = tmp_path / "run"
    cfg = resolve_config(None, tiny(dataset_cache, run_dir, "trial.workers=2", "deepspeed.zero_stage=3",
                                    "train.steps=10"))
    run_trial(cfg, progress=False, log=lambda _: None)
    straight = load_file(str(run_dir / "export/model.safetensors"))
    _drop_the_last_checkpoint(run_dir)
    assert run_trial(cfg, progress=False, log=lambda _: None).resumed_from == 5
    resumed = load_file(str(run_dir / "export/model.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


@pytest.mark.slow
def test_resume_on_another_worker_count(dataset_cache, tmp_path):
    """A checkpoint of 2 DeepSpeed ZeRO-2 workers loads whole into 1 plain-torch worker (the engine-agnostic
    layout: weights, Adam moments, masks), and the run continues there to its end."""
    run_dir = tmp_path / "run"
    two = resolve_config(None, tiny(dataset_cache, run_dir, "trial.workers=2", "deepspeed.zero_stage=2",
                                    "train.steps=10"))
    run_trial(two, progress=False, log=lambda _: None)
    _drop_the_last_checkpoint(run_dir)
    saved = load_file(str(list_checkpoints(run_dir / "checkpoints")[-1] / "state.safetensors"))
    one = resolve_config(None, tiny(dataset_cache, run_dir, "trial.workers=1", "train.steps=10"))
    setup = build_training(one, build_data(one.data, progress=False).dataset, "cpu")
    assert restore(run_dir / "checkpoints", setup.engine, lambda _: None) == 5
    loaded = setup.engine.full_state()
    for key, value in saved.items():
        if key.startswith(("model/", "optim/", "mask/")):
            assert torch.equal(loaded[key].to(value.dtype), value), key
    assert {k for k in saved if k.startswith("optim/")} == {k for k in loaded if k.startswith("optim/")}
    result = run_trial(one, progress=False, log=lambda _: None)
    assert result.resumed_from == 5 and math.isfinite(result.final["val_loss"])
    assert mlflow_run(run_dir).info.status == "FINISHED"


@pytest.mark.slow
def test_sigterm_marks_the_run_killed(dataset_cache, tmp_path):
    run_dir = tmp_path / "run"
    proc = cli(tiny(dataset_cache, run_dir, "train.steps=100000"))
    deadline = time.time() + 240
    while not list_checkpoints(run_dir / "checkpoints") and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert mlflow_run(run_dir).info.status == "KILLED"


def test_metrics_and_exports(dataset_cache, tmp_path):
    cfg = resolve_config(None, tiny(dataset_cache, tmp_path / "run", "train.steps=10",
                                    "model.pos_embedding=learned", "model.attention_sink=true"))
    result = run_trial(cfg, progress=False, log=lambda _: None)
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train_loss" in x] == list(range(1, 11))
    assert {"val_loss", "l0_total", "dead_neurons", "residual_kurtosis"} <= set(lines[-1])
    run = mlflow_run(result.run_dir)
    assert run.info.status == "FINISHED" and run.data.params["model.d_model"] == "64"
    again = run_trial(cfg, progress=False, log=lambda _: None)  # a finished trial of this config: not rerun
    assert again.reused and not result.reused and again.final == result.final
    assert len((result.run_dir / "metrics.jsonl").read_text().splitlines()) == len(lines)
    assert math.isfinite(run.data.metrics["residual_kurtosis"])
    accuracies = [v for k, v in run.data.metrics.items() if k.startswith("task/") and k.endswith("/accuracy")]
    assert accuracies and all(0.0 <= a <= 1.0 for a in accuracies)  # per-task scores of the unpruned model
    # our export reloads into the same model
    model = GPT(cfg.model, 512)
    model.load_state_dict(load_file(str(result.export_dir / "model.safetensors")))
    x = torch.randint(0, 512, (2, 20))
    # the paper layout, run through the paper's own forward (tests/reference_paper_gpt.py), gives our logits
    paper = result.export_dir / "paper"
    spec = json.loads((paper / "beeg_config.json").read_text())
    state = torch.load(paper / "final_model.pt", weights_only=True)
    torch.testing.assert_close(paper_forward(spec, state, x), model(x), atol=1e-5, rtol=1e-5)


def test_prune_verb_on_a_trained_run(dataset_cache, tmp_path, capsys):
    run_dir = tmp_path / "run"
    prune = ["prune.tasks=[if_equals, while_return_true]", "prune.steps=5", "prune.pairs=4", "prune.mean_batches=2"]
    cfg = resolve_config(None, tiny(dataset_cache, run_dir, "train.steps=5", *prune))
    run_trial(cfg, progress=False, log=lambda _: None)
    # a model this small and short learns no task: the record says which rule stopped the search, from the same
    # losses the pruning stage measures (the empty circuit calibrated on the train pairs, the whole model raw)
    model, tokenizer, means = load_for_pruning(run_dir, cfg, build_data(cfg.data, progress=False).dataset)
    train, test = (encode_task(TASKS["if_equals"], tokenizer, split=s, pairs=4) for s in ("train", "test"))
    pad = eot_id(tokenizer)
    full = circuit_loss(model, train, all_kept(model), means, pad, "cpu")
    empty = calibrated_test_loss(model, train, test, kept_nodes(model, []), means, pad, "cpu")
    target = 0.5
    code = main(["prune", "--no-progress", str(run_dir), *prune, f"prune.target_loss={target}"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "if_equals" in out
    circuits = run_dir / "circuits"
    record = CircuitRecord.load(circuits / "if_equals.json")
    expected = "direct" if empty <= target else "unreachable" if full > target else "found"
    assert record.status == expected and record.target_loss == target, (full, empty)
    printed = {"direct": "direct path: the empty circuit reaches the target",
               "unreachable": "target unreachable by the whole model", "found": "geometric mean of circuit edges"}
    assert printed[expected] in out
    assert record.empty_loss == pytest.approx(empty)
    page = (circuits / "if_equals.html").read_text()
    assert "if_equals circuit" in page and record.status in page  # the viewer page beside the record
    matrix = json.loads((circuits / "overlap.json").read_text())
    assert list(matrix["nodes"]) == (["if_equals"] if record.status == "found" else [])
    run = mlflow_run(run_dir)
    assert run.data.metrics["circuit/if_equals/empty_loss"] == pytest.approx(empty) and run.info.status == "FINISHED"
    if expected != "direct":  # a target above the empty circuit's loss: the verb says direct path, not unreachable
        assert main(["prune", "--no-progress", str(run_dir), *prune, f"prune.target_loss={empty + 0.1}"]) == 0
        assert printed["direct"] in capsys.readouterr().out
        assert CircuitRecord.load(circuits / "if_equals.json").status == "direct"


def test_prune_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["prune", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
