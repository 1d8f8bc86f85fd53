"""Fuzzed bad input (issue 17): CLI dotlist overrides, sweep files, data sources and prune task lists.

Every input here is wrong by construction; each must end in one line `circuitscale: error: ...` naming the
problem, exit code 2, no traceback (an exception escaping `main` fails the test with its traceback) and
nothing written in the working folder or the cache. Hypothesis runs derandomized (the same inputs in every
run, so main stays green) with no example database; CIRCUITSCALE_FUZZ_EXAMPLES sets the examples per
family (default 60). The run ends with a table of the inputs tried per family (`pytest_terminal_summary` in
tests/conftest.py prints TRIED), each of which ended in a clean error, or the test failed.
"""

import collections
import contextlib
import dataclasses
import io
import os
import typing
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli.main import main
from pipeline.config import ExperimentConfig
from pipeline.tasks import TASKS

EXAMPLES = int(os.environ.get("CIRCUITSCALE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
# a data source that does not exist: if a fuzzed config were valid after all, `data` would stop here, with an
# error that names data.sources rather than the fuzzed key, and the test would say so
NO_SOURCE = "data.sources=[/nonexistent/circuitscale-fuzz]"
# inputs that ended in a clean error, per family (the test's name); a traceback or a wrong exit fails the test
TRIED: collections.Counter = collections.Counter()


def run_cli(argv: list[str], cwd: Path) -> tuple[int, str]:
    """`circuitscale ARGV` in process, in `cwd`; (exit code, stderr). An exception escaping it fails the test."""
    cwd.mkdir(parents=True, exist_ok=True)
    err = io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def assert_clean_error(code: int, err: str, cwd: Path, *fragments: str) -> None:
    assert code == 2, err
    assert err.startswith("circuitscale: error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    assert any(f in err for f in fragments), (fragments, err)
    assert not any(cwd.iterdir()), f"written: {sorted(p.name for p in cwd.iterdir())}"
    family = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0]
    TRIED[family.removeprefix("test_")] += 1


# --- the config schema, read from the dataclasses themselves --------------------------------------------------

def _fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _fields(kind, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", kind


SCHEMA = dict(_fields(ExperimentConfig))
SECTIONS = sorted({k.split(".")[0] for k in SCHEMA})
NUMERIC = sorted(k for k, t in SCHEMA.items() if t in (int, float) and k != "data.sources")
LITERALS = sorted(k for k, t in SCHEMA.items() if typing.get_origin(t) is typing.Literal)
identifiers = st.from_regex(r"[a-z][a-z0-9_]{0,14}", fullmatch=True)


def _not_a_number(text: str) -> bool:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return True
    return not isinstance(value, int | float) or isinstance(value, bool)


unknown_keys = st.one_of(
    st.tuples(st.sampled_from(SECTIONS), identifiers).map(lambda p: f"{p[0]}.{p[1]}")
    .filter(lambda k: k not in SCHEMA),
    identifiers.filter(lambda k: k not in SECTIONS),
)
plain_values = st.text(st.characters(codec="utf-8", exclude_characters="\n\r\x00"), max_size=20)


@FUZZ
@given(key=unknown_keys, value=plain_values)
def test_unknown_keys(tmp_path_factory, key, value):
    cwd = tmp_path_factory.mktemp("cwd")
    code, err = run_cli(["data", "--no-progress", NO_SOURCE, f"{key}={value}"], cwd)
    assert_clean_error(code, err, cwd, key.split(".")[-1])


@FUZZ
@given(key=st.sampled_from(NUMERIC), value=plain_values.filter(_not_a_number).filter(lambda v: v.strip() != ""))
def test_wrong_types_for_numbers(tmp_path_factory, key, value):
    cwd = tmp_path_factory.mktemp("cwd")
    code, err = run_cli(["data", "--no-progress", NO_SOURCE, f"{key}={value}"], cwd)
    assert_clean_error(code, err, cwd, key, f"override '{key}=")


@FUZZ
@given(key=st.sampled_from(LITERALS), value=identifiers)
def test_values_outside_a_literal(tmp_path_factory, key, value):
    if value in typing.get_args(SCHEMA[key]):
        return
    cwd = tmp_path_factory.mktemp("cwd")
    code, err = run_cli(["data", "--no-progress", NO_SOURCE, f"{key}={value}"], cwd)
    assert_clean_error(code, err, cwd, key)


def _bad_number(low=None, high=None, *, integer=False, closed_low=False):
    """Values outside [low, high] (an open low bound unless closed_low), NaN and infinities included."""
    base = st.integers if integer else lambda **kw: st.floats(allow_nan=False, allow_infinity=False, **kw)
    options = [st.sampled_from(["nan", ".inf", "-.inf", "1e999"] if not integer else ["2e0", "1.5"])]
    if low is not None:
        options.append(base(max_value=low) if not closed_low else base(max_value=low - (1 if integer else 1e-9)))
    if high is not None:
        options.append(base(min_value=high + (1 if integer else 1e-9)))
    return st.one_of(*options).map(str)


OUT_OF_RANGE = {
    "model.d_model": _bad_number(low=0, integer=True),
    "model.num_layers": _bad_number(low=0, integer=True),
    "model.context_length": _bad_number(low=2, integer=True, closed_low=True),
    "model.afrac": _bad_number(low=0.0, high=1.0),
    "sparsity.density": _bad_number(low=0.0, high=1.0),
    "sparsity.anneal_power": _bad_number(low=0.0),
    "train.lr": _bad_number(low=0.0),
    "train.steps": _bad_number(low=0, integer=True),
    "train.batch_size": _bad_number(low=0, integer=True),
    "train.beta1": _bad_number(low=0.0, high=1.0 - 1e-9, closed_low=True),
    "train.warmup_frac": _bad_number(low=0.0, high=1.0, closed_low=True),
    "train.seed": _bad_number(low=0, integer=True, closed_low=True),
    "data.vocab_size": _bad_number(low=257, integer=True, closed_low=True),
    "data.val_fraction": _bad_number(low=0.0, high=1.0 - 1e-9),
    "prune.target_loss": _bad_number(low=0.0),
    "prune.steps": _bad_number(low=0, integer=True),
}


@FUZZ
@given(data=st.data(), key=st.sampled_from(sorted(OUT_OF_RANGE)))
def test_out_of_range_values(tmp_path_factory, data, key):
    value = data.draw(OUT_OF_RANGE[key], label="value")
    cwd = tmp_path_factory.mktemp("cwd")
    code, err = run_cli(["data", "--no-progress", NO_SOURCE, f"{key}={value}"], cwd)
    assert_clean_error(code, err, cwd, key)


YAML_INJECTION = st.one_of(
    st.builds("!!python/object/apply:os.system [{}]".format, identifiers),
    st.builds("!!python/name:{}".format, identifiers),
    st.builds("!!python/object/new:{}".format, identifiers),
    st.builds("!{} x".format, identifiers),  # an unknown local tag
    st.builds("*{}".format, identifiers),  # an alias with no anchor
    st.builds("[*{}]".format, identifiers),
    st.builds("{{a: *{}}}".format, identifiers),
)


@FUZZ
@given(key=st.sampled_from(sorted(k for k in SCHEMA if k != "data.sources")), value=YAML_INJECTION)
def test_yaml_injection_in_overrides(tmp_path_factory, key, value):
    cwd = tmp_path_factory.mktemp("cwd")
    code, err = run_cli(["data", "--no-progress", NO_SOURCE, f"{key}={value}"], cwd)
    assert_clean_error(code, err, cwd, "not plain YAML")


@FUZZ
@given(key=st.sampled_from(NUMERIC), values=st.lists(st.integers(1, 9), min_size=2, max_size=3))
def test_an_override_setting_a_key_twice(tmp_path_factory, key, values):
    cwd = tmp_path_factory.mktemp("cwd")
    code, err = run_cli(["data", "--no-progress", NO_SOURCE, *[f"{key}={v}" for v in values]], cwd)
    assert_clean_error(code, err, cwd, f"set {key} twice")


# --- prune task lists -----------------------------------------------------------------------------------------

@FUZZ
@given(tasks=st.lists(st.one_of(identifiers, st.sampled_from(sorted(TASKS))), min_size=1, max_size=4)
       .filter(lambda ts: any(t not in TASKS for t in ts) or len(set(ts)) < len(ts)))
def test_prune_task_lists(tmp_path_factory, tasks):
    cwd = tmp_path_factory.mktemp("cwd")
    code, err = run_cli(["data", "--no-progress", NO_SOURCE, f"prune.tasks=[{','.join(tasks)}]"], cwd)
    assert_clean_error(code, err, cwd, "prune.tasks")


# --- sweep files ----------------------------------------------------------------------------------------------

VALID_STUDY = {"name": "fuzz", "points": [{"model.d_model": 64}, {"model.d_model": 32}]}


def _mutations():
    point = st.fixed_dictionaries({"model.d_model": st.sampled_from([32, 64])})
    return st.one_of(
        st.just(("drop name", lambda s: {k: v for k, v in s.items() if k != "name"}, "name")),
        st.builds(lambda n: ("bad name", lambda s: s | {"name": n}, "name"),
                  st.sampled_from(["", " ", "..", ".", "a/b", "../../etc", "x y", "a\\b", "~", "$HOME"])),
        st.builds(lambda k: ("empty grid", lambda s: s | {"grid": {k: []}}, "at least one value"),
                  st.sampled_from(NUMERIC)),
        st.just(("no points", lambda s: {"name": s["name"]}, "grid or points")),
        st.builds(lambda p: ("duplicate point", lambda s: s | {"points": s["points"] + [dict(p)]}, "same config"),
                  point),
        st.builds(lambda k, a, b: ("conflicting overrides", lambda s: s | {"overrides": [f"{k}={a}", f"{k}={b}"]},
                                   "twice"), st.sampled_from(NUMERIC), st.integers(1, 9), st.integers(1, 9)),
        st.builds(lambda x: ("point not a mapping", lambda s: s | {"points": [x]}, "points"),
                  st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2))),
        st.builds(lambda n: ("bad seeds", lambda s: s | {"seeds": n}, "seeds"),
                  st.one_of(st.integers(max_value=0), st.sampled_from([True, "two", 1.5, [1]]))),
        st.builds(lambda k: ("unknown study key", lambda s: s | {k: 1}, k),
                  identifiers.filter(lambda k: k not in {f.name for f in dataclasses.fields(_study_config())})),
        st.builds(lambda k: ("unknown trial key", lambda s: s | {"points": [{k: 1}]}, k.split(".")[-1]),
                  unknown_keys),
        st.builds(lambda n: ("non-positive concurrency", lambda s: s | {"max_concurrent_trials": n},
                             "max_concurrent_trials"), st.integers(max_value=0)),
    )


def _study_config():
    from sweeps.spec import StudyConfig

    return StudyConfig


@FUZZ
@given(mutation=_mutations())
def test_sweep_files(tmp_path_factory, mutation):
    _, mutate, fragment = mutation
    folder, cwd = tmp_path_factory.mktemp("sweep"), tmp_path_factory.mktemp("cwd")
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(mutate(dict(VALID_STUDY))), encoding="utf-8")
    code, err = run_cli(["plan", str(path)], cwd)
    assert_clean_error(code, err, cwd, fragment)


@FUZZ
@given(content=st.one_of(st.binary(max_size=64).filter(lambda b: b"\x00" in b or not _utf8(b)),
                         st.text(max_size=64), st.lists(st.integers(), max_size=3).map(yaml.safe_dump)))
def test_sweep_files_that_are_not_a_study(tmp_path_factory, content):
    folder, cwd = tmp_path_factory.mktemp("sweep"), tmp_path_factory.mktemp("cwd")
    path = folder / "study.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    code, err = run_cli(["plan", str(path)], cwd)
    assert_clean_error(code, err, cwd, str(path))


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_a_bad_sweep_file_given_to_study_writes_nothing(tmp_path):
    path, cwd = tmp_path / "study.yaml", tmp_path / "cwd"
    path.write_text(yaml.safe_dump(VALID_STUDY | {"points": VALID_STUDY["points"] * 2}), encoding="utf-8")
    code, err = run_cli(["study", str(path)], cwd)
    assert_clean_error(code, err, cwd, "same config")


# --- data sources ---------------------------------------------------------------------------------------------

file_names = st.text(st.characters(codec="utf-8", exclude_characters="/\\\x00\n\r", exclude_categories=["Cs"]),
                     min_size=1, max_size=12).filter(lambda n: n.strip() not in ("", ".", ".."))


def _write_bad(folder: Path, name: str, kind: str) -> None:
    """One input file the data stage cannot use: each kind is skipped (and counted) or rejected."""
    if kind == "binary .py":
        (folder / f"{name}.py").write_bytes(b"def f():\x00\x01\x02 return 1\n")
    elif kind == "not utf-8 .py":
        (folder / f"{name}.py").write_bytes(b"x = '\xff\xfe'\n")
    elif kind == "empty .py":
        (folder / f"{name}.py").write_text("  \n\n", encoding="utf-8")
    elif kind == "executable renamed .py":
        (folder / f"{name}.py").write_bytes(Path("/bin/sh").resolve().read_bytes()[:4096])
    elif kind == "parquet without the text column":
        pq.write_table(pa.table({"content": ["x = 1\n"] * 3}), folder / f"{name}.parquet")
    elif kind == "parquet with a number column named text":
        pq.write_table(pa.table({"text": [1, 2, 3]}), folder / f"{name}.parquet")
    elif kind == "truncated parquet":
        pq.write_table(pa.table({"text": ["x = 1\n"] * 3}), folder / f"{name}.parquet")
        raw = (folder / f"{name}.parquet").read_bytes()
        (folder / f"{name}.parquet").write_bytes(raw[: len(raw) // 2])
    elif kind == "garbage .arrow":
        (folder / f"{name}.arrow").write_bytes(b"ARROW1\x00\x00garbage")
    elif kind == "symlink loop":
        (folder / name).symlink_to(folder)
    elif kind == "dangling symlink .py":
        (folder / f"{name}.py").symlink_to(folder / "missing-target.py")


BAD_KINDS = ["binary .py", "not utf-8 .py", "empty .py", "executable renamed .py", "parquet without the text column",
             "parquet with a number column named text", "truncated parquet", "garbage .arrow", "symlink loop",
             "dangling symlink .py"]


@FUZZ
@given(files=st.lists(st.tuples(file_names, st.sampled_from(BAD_KINDS)), min_size=1, max_size=4,
                      unique_by=lambda f: f[0]), nested=st.booleans(), space=st.sampled_from(["", " ", " ünï 文件 "]))
def test_data_sources_with_nothing_usable(tmp_path_factory, files, nested, space):
    root = tmp_path_factory.mktemp("src") / f"corpus{space}dir"
    folder = root / "deeper pkg" if nested else root
    folder.mkdir(parents=True)
    for name, kind in files:
        if not any(p.name.startswith(name) for p in folder.iterdir()):
            _write_bad(folder, name, kind)
    cwd, cache = tmp_path_factory.mktemp("cwd"), tmp_path_factory.mktemp("cache") / "c"
    code, err = run_cli(["data", "--no-progress", f"data.sources=['{root}']", f"data.cache_dir={cache}"], cwd)
    assert_clean_error(code, err, cwd, "data.sources", "data.text_column")
    assert not cache.exists()
