import ast
import difflib
import json
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cli.main import main
from model.config import ModelConfig
from model.gpt import GPT
from pipeline.config import resolve_config
from pipeline.data import build_data
from pipeline.errors import ConfigError
from pipeline.tasks import (
    FILES,
    NAMES,
    TASKS,
    Task,
    TaskError,
    TaskPair,
    _answer_id,
    check_task,
    encode_suite,
    encode_task,
    split_vocab,
    task_scores,
)

ROOT = Path(__file__).resolve().parents[2]
METHOD_TASKS = ["single_double_quote", "final_kwarg", "set_or_string", "set_or_string_fixedvarname", "class_init",
                "with_as", "bracket_brace", "with_open", "bracket_counting", "for_while", "else_elif",
                "fstring_brace", "if_ternary", "var_swap", "indent_for", "lambda_func", "if_equals",
                "enumerate_range", "var_if", "while_return_true"]
# `(` after `def f` is natural only before a parameter whose name does not merge with it (`(x`, `(self`):
# lambda_func drops the other draws (reported by `circuitscale tasks`); every other task keeps every draw.
DROPS_DRAWS = {"lambda_func"}


def draws(name: str, split: str, pairs: int, seed: int = 0) -> list[TaskPair]:
    """The raw pairs encode_task and check_task draw first."""
    rng = random.Random(f"{name}/{split}/{seed}")
    return [TASKS[name].generate(rng, split_vocab(split)) for _ in range(pairs)]


def test_the_twenty_tasks_of_the_method():
    assert sorted(TASKS) == sorted(METHOD_TASKS)
    assert {n for n, t in TASKS.items() if t.direct_path} == {"else_elif"}


@pytest.mark.parametrize("name", METHOD_TASKS)
def test_pairs_differ_only_in_a_short_cue_and_are_deterministic(name):
    task = TASKS[name]
    a = [task.generate(random.Random(3), split_vocab("train")) for _ in range(20)]
    b = [task.generate(random.Random(3), split_vocab("train")) for _ in range(20)]
    assert a == b
    for pair in a:
        ops = difflib.SequenceMatcher(a=pair.prompts[0], b=pair.prompts[1], autojunk=False).get_opcodes()
        changed = sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in ops if tag != "equal")
        assert 0 < changed <= 40, (name, pair.prompts)  # var_swap swaps two names: the longest cue
        assert pair.answers[0] != pair.answers[1] and len(pair.follows) == 2


def split_words(split: str) -> set[str]:
    v = split_vocab(split)
    return set(v.names) | set(v.funcs) | set(v.words) | {s for stems in v.files.values() for s in stems}


@pytest.mark.parametrize("name", METHOD_TASKS)
def test_train_and_test_prompts_share_no_words(name):
    """Names, function names, words and file stems come from disjoint halves, templates use none of them: a
    prompt of one split never names a word of the other (which is what keeps the overlap at 0)."""
    assert not split_words("train") & split_words("test")
    assert len(split_vocab("train").names) + len(split_vocab("test").names) == len(NAMES)
    assert not set(FILES["r"]) & set(FILES["w"])
    for split, other in (("train", "test"), ("test", "train")):
        for pair in draws(name, split, 40):
            words = set(re.findall(r"[A-Za-z_]+", " ".join(pair.prompts + pair.answers)))
            assert not words & split_words(other), (name, split, words & split_words(other))


@pytest.mark.parametrize("name", METHOD_TASKS)
def test_splits_hold_distinct_pairs_in_varied_code_and_never_overlap(name):
    """256 pairs per split: at least 200 distinct pairs, no test prompt among the train prompts, and each
    prompt + answer + follow is valid Python (the cue sits in realistic code)."""
    drawn = {split: draws(name, split, 256) for split in ("train", "test")}
    for split, pairs in drawn.items():
        assert len({p.prompts for p in pairs}) >= 200, (name, split)
        for pair in pairs[:64]:
            for prompt, answer, follow in zip(pair.prompts, pair.answers, pair.follows, strict=True):
                ast.parse(prompt + answer + follow)  # raises SyntaxError naming the line
    train = {p for pair in drawn["train"] for p in pair.prompts}
    assert not train & {p for pair in drawn["test"] for p in pair.prompts}
    assert len({p.prompts[0].split("\n")[0] for p in drawn["train"]}) > 20  # not one opening line
    assert len({p.prompts[0].count("\n") for p in drawn["train"]}) >= 3  # nor one length


def test_a_candidate_is_the_token_the_tokenizer_produces_in_its_continuation(small_dataset):
    tok = small_dataset.dataset.tokenizer()
    prompt = "def f(y):\n    z = open(y"
    assert _answer_id(tok, prompt, ")", " as g:\n") is not None  # `)` before ` as`
    assert _answer_id(tok, prompt, ")", "\n    print(z)\n") is None  # before a newline the token is `)\n`
    assert _answer_id(tok, prompt, ")\n", "    print(z)\n") == tok.encode(")\n", add_special_tokens=False).ids[0]
    loop = "def f(y):\n    for x in y:\n"
    assert _answer_id(tok, loop, " " * 8, "print(x)\n") is None  # the regex splits 7 spaces + ` print`
    assert _answer_id(tok, loop, " " * 7, " print(x)\n") is not None


@pytest.fixture(scope="module")
def cpu_dataset(tmp_path_factory):
    """The `cpu` study's corpus and tokenizer (the standard library and a quarter of idioms, vocab 2048)."""
    cfg = resolve_config(str(ROOT / "sweeps" / "configs" / "cpu.yaml"),
                         [f"data.cache_dir={tmp_path_factory.mktemp('cpu-data')}"])
    return build_data(cfg.data, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize(("dataset", "longest"), [("stdlib_dataset", 84), ("cpu_dataset", 80)])
def test_every_generator_meets_the_rules_under_a_real_tokenizer(request, dataset, longest):
    """Per task with 256 pairs per split (what `circuitscale tasks --pairs 256` reports): distinct prompts,
    no overlap, the same last token in both prompts of every pair (unless direct-path), every candidate the
    natural next token inside its continuation, and prompts that fit a 128-token context with room."""
    tok = request.getfixturevalue(dataset).dataset.tokenizer()
    lengths = []
    for name, task in TASKS.items():
        check = check_task(task, tok, pairs=256)
        assert check.distinct_train >= 400 and check.distinct_test >= 400 and check.overlap == 0, check
        assert check.same_last_token == (0.0 if task.direct_path else 1.0), check
        if name in DROPS_DRAWS:
            dropped, drawn = re.fullmatch(r"ok \((\d+) of (\d+) draws dropped: candidate\(s\) '\(' are not the "
                                          r"next token there .*\)", check.candidates).groups()
            assert int(dropped) < 0.7 * int(drawn), check
        else:
            assert check.candidates == "ok", check
        prompts = [p for split in ("train", "test") for pair in draws(name, split, 256) for p in pair.prompts]
        lengths += [len(e.ids) for e in tok.encode_batch(prompts, add_special_tokens=False)]
    assert max(lengths) <= longest, max(lengths)


@pytest.mark.slow
def test_every_task_is_expressible_under_the_default_tokenizer(stdlib_dataset):
    tokenizer = stdlib_dataset.dataset.tokenizer()
    encoded, failures = encode_suite(tokenizer, None, split="test", pairs=16)
    assert failures == {}
    for name, task in encoded.items():
        assert len(task.prompts) == 32 and task.candidates.shape == (32, 2)
        assert (task.candidates[0::2, 0] == task.candidates[1::2, 1]).all()  # the pair swaps its answers
        if not TASKS[name].direct_path:
            assert all(a[-1] == b[-1] for a, b in zip(task.prompts[0::2], task.prompts[1::2], strict=True))


def test_an_inexpressible_task_names_its_token(small_dataset):
    tokenizer = small_dataset.dataset.tokenizer()  # vocab 512 from a small corpus: ` range` is no token
    with pytest.raises(TaskError, match=r"candidate\(s\) ' range' are not single tokens"):
        encode_task(TASKS["enumerate_range"], tokenizer, split="train", pairs=8)
    encoded, failures = encode_suite(tokenizer, ["enumerate_range", "if_equals"], split="train", pairs=8)
    assert "enumerate_range" in failures and "if_equals" in encoded  # the others still run


def test_unknown_task_is_a_config_error():
    with pytest.raises(ConfigError, match=r"prune.tasks: unknown task\(s\) \['no_such_task'\]"):
        resolve_config(None, ["prune.tasks=[for_while, no_such_task]"])
    with pytest.raises(ValueError, match=r"prune.tasks: unknown task\(s\) \['no_such_task'\]"):
        encode_suite(None, ["no_such_task"], split="train", pairs=1)  # checked before any encoding


def test_scores_are_binary_cross_entropy_at_the_last_position(small_dataset):
    tokenizer = small_dataset.dataset.tokenizer()
    task = encode_task(TASKS["if_equals"], tokenizer, split="train", pairs=6)
    torch.manual_seed(0)
    model = GPT(ModelConfig(d_model=32, num_layers=1, d_head=8, context_length=64), tokenizer.get_vocab_size())
    scores = task_scores(model, task, pad_id=0, context_length=64, batch_size=5)  # batches mix lengths
    losses, hits = [], []
    with torch.no_grad():
        for prompt, (good, bad) in zip(task.prompts, task.candidates.tolist(), strict=True):
            logits = model(torch.tensor([prompt[-64:]]))[0, -1]  # left-truncated to the context
            pair = torch.stack([logits[good], logits[bad]])
            losses.append(-F.log_softmax(pair, dim=0)[0])
            hits.append(float(logits[good] > logits[bad]))
    assert scores["loss"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)
    assert scores["accuracy"] == pytest.approx(sum(hits) / len(hits))


def _constant(rng, v):
    """the same pair every draw, whose prompts end in different tokens"""
    return TaskPair(("x = 1\nif x", "x = 1\nwhile"), (" ==", ":\n"), (" 1:\n", "    pass\n"))


def _varied(rng, v):
    """a fresh name from the split's half every draw, both prompts ending in the same token"""
    x = rng.choice(v.names)
    return TaskPair((f"if {x}", f"for {x}"), (":", " in"), (" pass\n", " y:\n"))


def _sometimes_glued(rng, v):
    """`)` is natural before ` as`, not before a newline (there the token is `)\\n`)"""
    x = rng.choice(v.names)
    return TaskPair((f"with open({x}", f"y = open({x}"), (")", ")\n"),
                    (rng.choice([" as f:\n", "\n"]), "print(y)\n"))


def test_task_check_measures_the_generator_rules(small_dataset):
    tokenizer = small_dataset.dataset.tokenizer()
    constant = check_task(Task("constant", "", _constant), tokenizer, pairs=16)
    assert (constant.distinct_train, constant.distinct_test, constant.overlap) == (2, 2, 2)  # test = train
    assert constant.same_last_token == 0.0 and not constant.direct_path
    assert constant.candidates == "task constant: 160 of 160 pairs' prompts end in different tokens"
    varied = check_task(Task("varied", "", _varied, direct_path=True), tokenizer, pairs=64)
    half = len(split_vocab("train").names)
    assert varied.distinct_train == 2 * half and varied.overlap == 0  # the splits draw from disjoint names
    assert varied.same_last_token == 1.0 and varied.direct_path
    glued = check_task(Task("glued", "", _sometimes_glued), tokenizer, pairs=64)
    assert re.fullmatch(r"ok \(\d+ of \d+ draws dropped: candidate\(s\) '\)' are not the next token there .*\)",
                        glued.candidates), glued.candidates
    assert check_task(TASKS["enumerate_range"], tokenizer, pairs=8).candidates.startswith("task enumerate_range")
    assert TASKS["else_elif"].direct_path and not TASKS["for_while"].direct_path


def test_tasks_verb_prints_a_row_per_task_and_a_json_line(small_corpus, tmp_path, capsys):
    args = [f"data.sources=[{small_corpus}]", f"data.cache_dir={tmp_path}", "data.vocab_size=512",
            "data.val_fraction=0.2", "prune.tasks=[while_return_true, for_while]"]
    assert main(["tasks", "--no-progress", "--pairs", "32", *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].startswith("while_return_true") and lines[2].startswith("for_while")
    assert lines[1].endswith("  ok") and lines[2].endswith("  ok")
    figures = json.loads(lines[-1])["tasks"]
    assert list(figures) == ["while_return_true", "for_while"]
    assert figures["while_return_true"] == {"distinct_train": 64, "distinct_test": 64, "overlap": 0,
                                            "same_last_token": 1.0, "direct_path": False}
    assert main(["tasks", "--pairs", "0", *args]) == 2
