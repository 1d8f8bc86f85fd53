"""The trial stage end to end on tiny configs: exact resume after SIGKILL, corrupt-checkpoint
fallback, run statuses in MLflow, and the exports."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from infra.checkpoint import list_checkpoints
from model.gpt import GPT
from model.sparsity import sparse_tensors
from pipeline.config import resolve_config
from pipeline.train import restore, torch_engine
from pipeline.trial import run_trial

SCRIPT = Path(sys.executable).parent / "circuitscale"


@pytest.fixture(scope="module")
def dataset_cache(small_dataset):
    return small_dataset.dataset.folder.parent


def tiny(dataset_cache, run_dir, *extra):
    return [
        f"data.sources=[{SMALL}]", f"data.cache_dir={dataset_cache}", "data.vocab_size=512", "data.val_fraction=0.2",
        "data.shard_tokens=20000", "model.d_model=64", "model.num_layers=2", "model.context_length=32",
        "train.batch_size=4", "train.steps=40", "train.eval_every=10", "train.checkpoint_every=5",
        "train.eval_batches=2", "sparsity.density=0.0625", f"train.run_dir={run_dir}", *extra,
    ]


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
    assert cli(tiny(dataset_cache, straight, *extra)).wait(timeout=300) == 0
    proc = cli(tiny(dataset_cache, killed, *extra))
    deadline = time.time() + 240
    while len(list_checkpoints(killed / "checkpoints")) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    steps_done = int(list_checkpoints(killed / "checkpoints")[-1].name.split("-")[1])
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


def test_corrupt_checkpoint_falls_back_to_the_previous_one(dataset_cache, tmp_path):
    cfg = resolve_config(None, tiny(dataset_cache, tmp_path / "run", "train.steps=10"))
    run_trial(cfg, progress=False, log=lambda _: None)
    checkpoints = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in checkpoints] == ["step-00000005", "step-00000010"]
    state = checkpoints[-1] / "state.safetensors"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated
    model = GPT(cfg.model, 512)
    engine = torch_engine(model, sparse_tensors(model, cfg.sparsity), cfg.train, cfg.sparsity)
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
    assert math.isfinite(run.data.metrics["residual_kurtosis"])
    accuracies = [v for k, v in run.data.metrics.items() if k.startswith("task/") and k.endswith("/accuracy")]
    assert accuracies and all(0.0 <= a <= 1.0 for a in accuracies)  # per-task scores of the unpruned model
    # our export reloads into the same model
    model = GPT(cfg.model, 512)
    model.load_state_dict(load_file(str(result.export_dir / "model.safetensors")))
    x = torch.randint(0, 512, (2, 20))
    # the paper layout, run through the forward its spec describes, gives our logits
    paper = result.export_dir / "paper"
    spec = json.loads((paper / "beeg_config.json").read_text())
    state = torch.load(paper / "final_model.pt", weights_only=True)
    torch.testing.assert_close(paper_forward(spec, state, x), model(x), atol=1e-5, rtol=1e-5)


def paper_forward(cfg: dict, sd: dict, idx: torch.Tensor) -> torch.Tensor:
    """The forward described in shared/FORMAT-paper-checkpoint.md (no AbsTopK: afrac is null here)."""
    assert cfg["afrac"] is None and cfg["rms_norm"] and not cfg["tied_unembed"]
    B, T = idx.shape
    H, D = cfg["n_head"], cfg["d_head"]
    norm = lambda x, w: F.rms_norm(x, (x.shape[-1],), w)  # noqa: E731
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        h = norm(x, sd[p + "ln_1.weight"])
        q, k, v = F.linear(h, sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]).split(H * D, dim=-1)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        if cfg["sink"]:
            sink = sd[p + "attn.attn_imp.sink_logit"].view(1, H, 1, 1).expand(B, H, T, 1)
            probs = torch.softmax(torch.cat([sink, scores], dim=-1), dim=-1)[..., 1:]
        else:
            probs = torch.softmax(scores, dim=-1)
        y = (probs @ v).transpose(1, 2).reshape(B, T, H * D)
        x = x + F.linear(y, sd[p + "attn.c_proj.weight"], sd[p + "attn.c_proj.bias"])
        h = F.gelu(F.linear(norm(x, sd[p + "ln_2.weight"]), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    logits = F.linear(norm(x, sd["transformer.ln_f.weight"]), sd["lm_head.weight"]) + sd["final_logits_bias"]
    if cfg["enable_bigram_table"]:
        logits = logits + sd["bigram_table"][idx]
    return logits


def test_prune_verb_on_a_trained_run(dataset_cache, tmp_path, capsys):
    from pipeline.cli import main

    cfg = resolve_config(None, tiny(dataset_cache, tmp_path / "run", "train.steps=5"))
    run_trial(cfg, progress=False, log=lambda _: None)
    code = main(["prune", "--no-progress", str(tmp_path / "run"), "prune.tasks=[if_equals, while_return_true]",
                 "prune.steps=5", "prune.pairs=4", "prune.target_loss=5.0", "prune.mean_batches=2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "if_equals" in out and "geometric mean of circuit edges" in out
    circuits = tmp_path / "run" / "circuits"
    record = json.loads((circuits / "if_equals.json").read_text())
    assert record["status"] == "found" and record["sufficiency_loss"] <= 5.0
    page = (circuits / "if_equals.html").read_text()
    assert "<svg" in page and "if_equals circuit" in page  # the viewer page beside the record
    matrix = json.loads((circuits / "overlap.json").read_text())
    assert matrix["nodes"]["if_equals"]["if_equals"] in (0.0, 1.0)
    run = mlflow_run(tmp_path / "run")
    assert "circuit/if_equals/edges" in run.data.metrics and run.info.status == "FINISHED"


def test_prune_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["prune", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
