import pytest

from pipeline.errors import ConfigError
from sweeps.spec import load_study

STUDY = """
name: demo
base: base.yaml
overrides: [train.steps=5]
grid:
  model.d_model: [64, 128]
  sparsity.density: [0.25, 0.0625]
points:
  - {model.d_model: 64, sparsity.density: 1.0}
"""


def write(tmp_path, text, base="model:\n  num_layers: 2\n"):
    (tmp_path / "base.yaml").write_text(base)
    (tmp_path / "study.yaml").write_text(text)
    return tmp_path / "study.yaml"


def test_grid_and_points_expand_to_validated_trials(tmp_path):
    study, trials = load_study(write(tmp_path, STUDY), ["train.seed=3"])
    assert study.name == "demo"
    assert [t.name for t in trials] == [
        "000-d_model=64-density=0.25", "001-d_model=64-density=0.0625",
        "002-d_model=128-density=0.25", "003-d_model=128-density=0.0625", "004-d_model=64-density=1.0",
    ]
    for trial in trials:
        assert trial.config.model.num_layers == 2  # from the base file
        assert trial.config.train.steps == 5 and trial.config.train.seed == 3  # study and CLI overrides
        assert trial.config.model.d_model == trial.point["model.d_model"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            STUDY.replace("[64, 128]", "[64, 100]"),
            "trial 002-d_model=100-density=0.25: model.d_model: must be divisible",
        ),
        (STUDY.replace("model.d_model:", "model.width:"), "model.width"),
        (STUDY.replace("name: demo\n", ""), "name"),
        ("name: x\n", "needs a grid or points"),
        (STUDY.replace("[0.25, 0.0625]", "[]"), "grid.sparsity.density: must list at least one value"),
    ],
)
def test_bad_studies_fail_before_compute(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as info:
        load_study(write(tmp_path, text))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_points_only_study_has_exactly_its_points(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\npoints:\n  - {model.d_model: 64}\n  - {model.d_model: 32}\n")
    _, trials = load_study(path)
    assert [t.config.model.d_model for t in trials] == [64, 32]


def test_study_keys_can_be_overridden_from_the_command_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ngrid:\n  model.d_model: [64]\n")
    study, trials = load_study(path, ["study.storage_path=/x", "study.max_concurrent_trials=3", "train.steps=7"])
    assert study.storage_path == "/x" and study.max_concurrent_trials == 3 and trials[0].config.train.steps == 7


@pytest.mark.parametrize("name,count", [("smoke", 3), ("cpu", 10), ("paper", 56)])
def test_shipped_studies_load(name, count):
    from pathlib import Path

    study, trials = load_study(Path(__file__).resolve().parents[2] / "sweeps" / f"{name}.yaml")
    assert study.name == name and len(trials) == count
    if name == "paper":  # the Figure 3 grid: 23 buildable (ef, L0) points (ef 1 at L0 7.4M is dense) + a ladder
        # of 5 dense widths, two seeds each
        assert sum(t.config.sparsity.density < 1 for t in trials) == 22 * 2
        assert all(t.config.model.num_layers == 8 and t.config.prune.target_loss == 0.15 for t in trials)
        assert study.lr_search.lrs and study.seeds == 2
    if name != "smoke":  # both presets: the paper's activation sparsity
        assert all(t.config.model.afrac == 0.25 for t in trials)
    if name == "cpu":  # two seeds of each sparse point (d64 at 1/4 and 1/2) and of each rung of the dense ladder;
        # each point's rate pinned in the file to the search's choice (its comments), different from the default
        sparse = sorted(t.config.sparsity.density for t in trials if t.config.sparsity.density < 1)
        assert sparse == [0.25, 0.25, 0.5, 0.5]
        dense = sorted(t.config.model.d_model for t in trials if t.config.sparsity.density == 1)
        assert dense == [32, 32, 48, 48, 64, 64]
        assert not study.lr_search.lrs and all("train.lr" in p for p in study.points)
        assert {t.config.train.lr for t in trials} == {0.03, 0.01}


def test_seeds_give_one_trial_per_point_and_seed(tmp_path):
    text = STUDY.replace("points:\n  - {model.d_model: 64, sparsity.density: 1.0}",
                         "points:\n  - {model.d_model: 64, sparsity.density: 1.0, seeds: 1}") + "seeds: 2\n"
    _, trials = load_study(write(tmp_path, text), ["train.seed=5"])
    assert [t.name for t in trials[:2]] == ["000-d_model=64-density=0.25-seed=5", "000-d_model=64-density=0.25-seed=6"]
    assert [t.config.train.seed for t in trials] == [5, 6, 5, 6, 5, 6, 5, 6, 5]  # the dense point: one seed
    assert trials[-1].name == "004-d_model=64-density=1.0-seed=5"
    assert {t.point_name for t in trials[:2]} == {"000-d_model=64-density=0.25"}
    assert "seeds" not in trials[-1].point


@pytest.mark.parametrize(("text", "fragment"), [
    (STUDY + "seeds: 0\n", "seeds: must be a positive integer"),
    (STUDY.replace("density: 1.0}", "density: 1.0, seeds: 0}"), "seeds: must be a positive integer, got 0"),
    (STUDY + "lr_search: {lrs: [0.01, 0.01]}\n", "lr_search.lrs: must be distinct positive"),
    (STUDY + "lr_search: {lrs: [0.01], budget: 0}\n", "budget must lie in (0, 1]"),
])
def test_bad_seeds_and_lr_search_fail_before_compute(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as info:
        load_study(write(tmp_path, text))
    assert fragment in str(info.value)
