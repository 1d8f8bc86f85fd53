import pytest

from pipeline.config import resolve_config
from pipeline.trial import run_trial


@pytest.mark.slow
def test_search_keeps_the_smallest_circuit_and_starts_at_the_centres(small_dataset, small_corpus, tmp_path):
    import ray

    from sweeps.prune_search import SEARCHED, search_prune

    cfg = resolve_config(None, [
        f"data.sources=[{small_corpus}]", f"data.cache_dir={small_dataset.dataset.folder.parent}",
        "data.vocab_size=512", "data.val_fraction=0.2", "data.shard_tokens=20000", "model.d_model=32",
        "model.num_layers=1", "model.d_head=8", "model.context_length=32", "train.batch_size=4", "train.steps=3",
        "train.eval_batches=1", f"train.run_dir={tmp_path / 'run'}", "prune.steps=3", "prune.pairs=4",
        "prune.target_loss=5.0", "prune.mean_batches=1",
    ])
    run_trial(cfg, progress=False, log=lambda _: None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = search_prune(tmp_path / "run", cfg, "if_equals", budget=3, storage=tmp_path / "tune",
                              data=small_dataset.dataset.folder)
    finally:
        ray.shutdown()
    assert len(result.trials) == 3
    assert any(all(t[k] == getattr(cfg.prune, k) for k in SEARCHED) for t in result.trials)  # the centres
    # a target above ln 2: the empty circuit (calibrated) reaches it under every setting, so the task is direct
    assert [t["status"] for t in result.trials] == ["direct"] * 3
    assert result.best.status == "direct" and result.best.nodes == []


def test_best_of_keeps_the_smallest_found_circuit_then_a_direct_one():
    from pipeline.records import CircuitRecord
    from sweeps.prune_search import best_of

    def rec(status: str, edges: int = 0) -> CircuitRecord:
        return CircuitRecord(task="t", target_loss=0.1, unpruned_loss=0.05, total_nodes=9, status=status, edges=edges)

    done = [(rec("unreachable"), {"lr": 1}), (rec("found", 30), {"lr": 2}), (rec("found", 12), {"lr": 3}),
            (rec("found", 12), {"lr": 4}), (rec("direct"), {"lr": 5})]
    assert best_of(done) == (rec("found", 12), {"lr": 3})
    assert best_of([done[0], done[4]]) == (rec("direct"), {"lr": 5})
    assert best_of([done[0]]) == (None, {}) and best_of([]) == (None, {})


@pytest.mark.parametrize(("cluster", "device"), [({"CPU": 96.0, "GPU": 8.0}, "cuda"), ({"CPU": 4.0}, "cpu")])
def test_search_trials_prune_on_a_gpu_of_their_own_when_the_cluster_has_gpus(monkeypatch, tmp_path, cluster, device):
    """No GPU here: what is checked is what each Tune trial asks Ray for and the device its pruning gets."""
    import ray
    from ray import tune

    from pipeline.records import CircuitRecord
    from sweeps import prune_search

    asked, seen = {}, {}

    class Tuner:  # records the trial and its search space instead of running them
        def __init__(self, trainable, *, param_space, **_):
            asked["trainable"], asked["space"] = trainable, param_space

        def fit(self):
            return []

    monkeypatch.setattr(prune_search, "init_ray", lambda verbose: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: cluster)
    monkeypatch.setattr(tune, "Tuner", Tuner)
    monkeypatch.setattr(tune, "with_resources",
                        lambda trainable, resources: asked.update(resources=resources) or trainable)
    cfg = resolve_config(None, [])
    prune_search.search_prune(tmp_path / "run", cfg, "if_equals", 2, storage=tmp_path / "tune", data=tmp_path / "data")
    assert asked["resources"] == ({"cpu": 1, "gpu": 1} if device == "cuda" else {"cpu": 1})
    assert asked["space"]["device"] == device

    def load_for_pruning(run_dir, cfg, dataset, device="cpu"):
        seen["load"] = device
        return "model", "tokenizer", "means"

    def prune_task(model, train, test, means, cfg, *, pad_id, device="cpu", seed=0, progress=False):
        seen["prune"] = device
        return CircuitRecord(task="if_equals", target_loss=0.15, unpruned_loss=0.1, total_nodes=9, status="direct")

    class Context:
        def get_trial_dir(self):
            return str(tmp_path)

    monkeypatch.setattr(prune_search, "Dataset", type("Dataset", (), {"open": staticmethod(lambda path: None)}))
    monkeypatch.setattr(prune_search, "load_for_pruning", load_for_pruning)
    monkeypatch.setattr(prune_search, "encode_task", lambda *args, **kwargs: None)
    monkeypatch.setattr(prune_search, "eot_id", lambda tokenizer: 0)
    monkeypatch.setattr(prune_search, "prune_task", prune_task)
    monkeypatch.setattr(tune, "get_context", Context)
    monkeypatch.setattr(tune, "report", lambda metrics: None)
    config = {k: v for k, v in asked["space"].items() if k not in prune_search.SEARCHED}
    asked["trainable"](config | {k: getattr(cfg.prune, k) for k in prune_search.SEARCHED})
    assert seen == {"load": device, "prune": device}  # the model, its node means and the masks: all on it
    assert (tmp_path / prune_search.RECORD).is_file()


def test_search_device_takes_cpu_or_cuda_only():
    from sweeps.prune_search import search_device

    assert search_device("cuda") == "cuda" and search_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="device"):
        search_device("cuda:1")


@pytest.mark.slow
def test_prune_verb_searches_when_asked(small_dataset, small_corpus, tmp_path, capsys):
    from cli.main import main

    args = [f"data.sources=[{small_corpus}]", f"data.cache_dir={small_dataset.dataset.folder.parent}",
            "data.vocab_size=512", "data.val_fraction=0.2", "data.shard_tokens=20000", "model.d_model=32",
            "model.num_layers=1", "model.d_head=8", "model.context_length=32", "train.batch_size=4",
            "train.steps=3", "train.eval_batches=1", f"train.run_dir={tmp_path / 'run'}"]
    run_trial(resolve_config(None, args), progress=False, log=lambda _: None)
    import ray

    try:
        code = main(["prune", "--no-progress", str(tmp_path / "run"), "prune.tasks=[if_equals]",
                     "prune.search_runs=2", "prune.steps=3", "prune.pairs=4", "prune.target_loss=5.0",
                     "prune.mean_batches=1"])
    finally:
        ray.shutdown()
    assert code == 0, capsys.readouterr()
    assert (tmp_path / "run" / "circuits" / "if_equals.json").is_file()
    assert list((tmp_path / "run" / "prune_search").glob("prune-if_equals/*/circuit.json"))
