import ast
import random
import re

import pytest

from pipeline.config import resolve_config
from pipeline.data import build_data
from pipeline.errors import ConfigError, DataError
from pipeline.idioms import generate, program
from pipeline.tasks import TASKS, split_vocab


@pytest.fixture(scope="module")
def sample() -> list[str]:
    return list(generate(0, 1_500_000))


def test_every_program_parses(sample):
    for text in sample:
        ast.parse(text)  # raises SyntaxError naming the line


def test_generation_is_deterministic_in_the_seed():
    assert list(generate(3, 50_000)) == list(generate(3, 50_000))
    assert list(generate(3, 50_000)) != list(generate(4, 50_000))
    assert program(random.Random(1)) == program(random.Random(1))


def test_sample_covers_the_idioms_and_varies(sample):
    text = "\n".join(sample)
    for construct in ("while ", "for ", "elif ", " if ", " else ", "lambda ", "def ", "class ", "__init__(self",
                      "self.", "with open(", "enumerate(", "range(", 'f"', "f'", "print(", "return ", "# ",
                      "[[", "{'", '{"', ".add(", ".items()", "+=", "= '", '= "'):
        assert construct in text, construct
    swaps = re.findall(r"^\s*(\w+), (\w+) = \2, \1$", text, flags=re.M)
    assert swaps
    assert len(set(sample)) == len(sample)  # no two programs alike
    starts = {t.splitlines()[0].split()[0] for t in sample}
    assert len(starts) > 50  # not one template: programs open in many ways
    assert any(t.startswith("  ") or "\n  " in t and "\n    " not in t for t in sample)  # 2-space indents too


def longest_shared_ngram(prompts: list[str], corpus: str) -> tuple[int, str]:
    """Longest run of prompt tokens (words and punctuation) that occurs verbatim in the corpus."""
    best = (0, "")
    for prompt in prompts:
        tokens = re.findall(r"\w+|[^\w\s]", prompt)
        lo = 0
        for start in range(len(tokens)):
            n = max(lo, best[0]) + 1
            while start + n <= len(tokens):
                pattern = r"\s*".join(re.escape(t) for t in tokens[start: start + n])
                if not re.search(pattern, corpus):
                    break
                best = max(best, (n, " ".join(tokens[start: start + n])))
                n += 1
    return best


def test_held_out_task_prompts_do_not_occur_in_the_corpus(sample):
    """No held-out prompt of 6 or more tokens occurs verbatim (some prompts are two tokens, e.g. `for file`,
    which any Python corpus contains); the longest shared n-gram is reported."""
    corpus = "\n".join(sample)
    rng, vocab = random.Random(0), split_vocab("test")
    prompts = [p for task in TASKS.values() for _ in range(3) for p in task.generate(rng, vocab).prompts]
    verbatim = [p for p in prompts if p in corpus and len(re.findall(r"\w+|[^\w\s]", p)) >= 6]
    assert not verbatim, verbatim[:3]
    n, gram = longest_shared_ngram(prompts[::4], corpus)
    print(f"longest shared n-gram between held-out task prompts and 1.5 MB of idioms: {n} tokens: {gram!r}")
    assert n < 30


def test_idioms_source_mixes_by_bytes(small_corpus, tmp_path):
    base = [f"data.cache_dir={tmp_path}", "data.vocab_size=512", "data.shard_tokens=20000"]
    cfg = resolve_config(None, base + [f"data.sources=[{small_corpus},idioms]",
                                       f"data.mix={{{small_corpus}: 1, idioms: 1}}"])
    result = build_data(cfg.data, progress=False)
    used = result.dataset.manifest["bytes_per_source"]
    assert used["idioms"] == pytest.approx(used[str(small_corpus)], rel=0.05)
    alone = resolve_config(None, base + ["data.sources=[idioms]", "data.idioms_mb=0.3"])
    used = build_data(alone.data, progress=False).dataset.manifest["bytes_per_source"]
    assert used["idioms"] == pytest.approx(300_000, rel=0.05)
    with pytest.raises(ConfigError, match="data.mix"):
        resolve_config(None, base + ["data.sources=[idioms]", "data.mix={python:stdlib: 1}"])


def test_mix_trims_real_sources_to_their_share(small_corpus, tmp_path):
    from pipeline.build import collect_documents

    full = collect_documents([str(small_corpus)], exclude=[], text_column="text", progress=False)
    mixed = collect_documents([str(small_corpus), "idioms"], exclude=[], text_column="text", progress=False,
                              mix={str(small_corpus): 1.0, "idioms": 3.0})
    real = mixed.bytes_per_source[str(small_corpus)]
    assert real == full.bytes_per_source[str(small_corpus)]  # the only real source is used whole
    assert mixed.bytes_per_source["idioms"] == pytest.approx(3 * real, rel=0.02)
    with pytest.raises(DataError, match="data.mix"):
        collect_documents([str(small_corpus)], exclude=[], text_column="text", progress=False, mix={"x": 1.0})


def test_a_presets_mix_is_cleared_with_null(small_corpus):
    from pathlib import Path

    preset = Path(__file__).resolve().parents[2] / "sweeps" / "configs" / "cpu.yaml"
    assert resolve_config(preset).data.mix == {"python:stdlib": 0.75, "idioms": 0.25}
    with pytest.raises(ConfigError, match="data.mix=null"):
        resolve_config(preset, [f"data.sources=[{small_corpus}]"])
    assert resolve_config(preset, [f"data.sources=[{small_corpus}]", "data.mix=null"]).data.mix is None
