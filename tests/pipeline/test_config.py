import pytest

from pipeline.config import ExperimentConfig, resolve_config, save_config
from pipeline.errors import ConfigError


def test_defaults_resolve_to_the_dataclass_defaults():
    assert resolve_config() == ExperimentConfig()


def test_yaml_then_dotlist_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  d_model: 256\n  num_layers: 2\nsparsity:\n  density: 0.25\n")
    cfg = resolve_config(path, ["model.d_model=64", "train.steps=7"])
    assert cfg.model.d_model == 64  # the override wins over the file
    assert cfg.model.num_layers == 2  # the file wins over the default
    assert cfg.sparsity.density == 0.25
    assert cfg.train.steps == 7


def test_round_trip_through_saved_yaml(tmp_path):
    cfg = resolve_config(
        None,
        [
            "data.sources=[a/b, 's3://bucket/x']",
            r'data.required_tokens=["]]\n", "(\""]',  # YAML escapes, as typed in a shell
            "sparsity.density=0.0625",
            "deepspeed.zero_stage=3",
            "prune.tasks=[for_while, var_swap]",
            "prune.mean_pooling=per_position",
        ],
    )
    path = save_config(cfg, tmp_path)
    assert resolve_config(path) == cfg
    assert cfg.data.required_tokens == ["]]\n", '("']


def test_several_workers_need_a_sharding_engine():
    with pytest.raises(ConfigError, match="trial.engine: torch trains in one process; 2 workers need deepspeed"):
        resolve_config(None, ["trial.workers=2", "trial.engine=torch"])
    assert resolve_config(None, ["trial.workers=2"]).trial.engine == "auto"


def test_bf16_needs_a_zero_stage_with_a_reachable_master_copy():
    # measured: bf16 at stage 0 ran DeepSpeed's FP16_UnfusedOptimizer and the model stayed dense (12288 of
    # 12288 weights nonzero against a budget of 768); at stage 2 the projection held
    with pytest.raises(ConfigError, match="deepspeed.precision: bf16 needs deepspeed.zero_stage >= 1"):
        resolve_config(None, ["deepspeed.precision=bf16", "deepspeed.zero_stage=0"])
    assert resolve_config(None, ["deepspeed.precision=bf16"]).deepspeed.zero_stage == 2


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("model.width=3", "model.width"),
        ("nonsense.key=1", "nonsense"),
        ("model.d_model=abc", "model.d_model"),
        ("sparsity.density=0", "sparsity.density: must lie in (0, 1]"),
        ("sparsity.density=1.5", "sparsity.density: must lie in (0, 1]"),
        ("model.d_model=100", "model.d_model: must be divisible by model.d_head=16"),
        ("model.afrac=0.005", "model.afrac: 0.005 keeps int(afrac x 128) = 0 of the 128 channels at attn_in"),
        ("data.vocab_size=100", "data.vocab_size: must be at least 257"),
        ("train.steps=-5", "train.steps: must be a positive integer"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
        ("prune.mean_pooling=median", "prune.mean_pooling"),
        ("trial.workers=0", "trial.workers"),
        ("data.val_fraction=1", "data.val_fraction"),
        ("tracking.uri=runs/mlflow.db", "tracking.uri"),
        ("justakey", "must look like section.key=value"),
    ],
)
def test_bad_values_name_the_key_in_one_line(override, fragment):
    with pytest.raises(ConfigError) as info:
        resolve_config(None, [override])
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_afrac_needs_one_kept_channel_only_where_it_applies():
    """0.005 x d_mlp 512 keeps 2 neurons, while 0.005 x d_model 128 would keep none."""
    cfg = resolve_config(None, ["model.afrac=0.005", "model.afrac_locations=[mlp_neuron]"])
    assert cfg.model.afrac == 0.005
    with pytest.raises(ConfigError, match="= 0 of the 128 channels at mlp_out"):
        resolve_config(None, ["model.afrac=0.005", "model.afrac_locations=[mlp_neuron, mlp_out]"])


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping"):
        resolve_config(scalar)


def test_shipped_presets_resolve():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "sweeps" / "configs"
    presets = sorted(root.glob("*.yaml"))
    assert presets
    for preset in presets:
        resolve_config(preset)
