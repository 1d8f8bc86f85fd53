import difflib
import json
import re

import pytest
import torch
import torch.nn.functional as F

from cli.main import main
from model.config import ModelConfig
from model.gpt import GPT
from pipeline.config import resolve_config
from pipeline.errors import ConfigError
from pipeline.tasks import (
    NAMES,
    TASKS,
    Task,
    TaskError,
    TaskPair,
    check_task,
    encode_suite,
    encode_task,
    split_vocab,
    task_scores,
)

METHOD_TASKS = ["single_double_quote", "final_kwarg", "set_or_string", "set_or_string_fixedvarname", "class_init",
                "with_as", "bracket_brace", "with_open", "bracket_counting", "for_while", "else_elif",
                "fstring_brace", "if_ternary", "var_swap", "indent_for", "lambda_func", "if_equals",
                "enumerate_range", "var_if", "while_return_true"]


def test_the_twenty_tasks_of_the_method():
    assert sorted(TASKS) == sorted(METHOD_TASKS)


@pytest.mark.parametrize("name", METHOD_TASKS)
def test_pairs_differ_only_in_a_short_cue_and_are_deterministic(name):
    import random

    task = TASKS[name]
    a = [task.generate(random.Random(3), split_vocab("train")) for _ in range(20)]
    b = [task.generate(random.Random(3), split_vocab("train")) for _ in range(20)]
    assert a == b
    for pair in a:
        ops = difflib.SequenceMatcher(a=pair.prompts[0], b=pair.prompts[1], autojunk=False).get_opcodes()
        changed = sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in ops if tag != "equal")
        assert 0 < changed <= 40, (name, pair.prompts)  # var_swap swaps two names: the longest cue
        assert pair.answers[0] != pair.answers[1]


@pytest.mark.parametrize("name", METHOD_TASKS)
def test_train_and_test_prompts_share_no_names(name):
    import random

    test_half = set(split_vocab("test").names) | set(split_vocab("test").funcs)
    rng = random.Random(0)
    for _ in range(30):
        pair = TASKS[name].generate(rng, split_vocab("train"))
        words = set(re.findall(r"[A-Za-z_]+", " ".join(pair.prompts + pair.answers)))
        assert not words & test_half, (name, words & test_half)
    assert not set(split_vocab("train").names) & set(split_vocab("test").names)
    assert len(split_vocab("train").names) + len(split_vocab("test").names) == len(NAMES)


@pytest.mark.slow
def test_every_task_is_expressible_under_the_default_tokenizer(stdlib_dataset):
    tokenizer = stdlib_dataset.dataset.tokenizer()
    encoded, failures = encode_suite(tokenizer, None, split="test", pairs=16)
    assert failures == {}
    for task in encoded.values():
        assert len(task.prompts) == 32 and task.candidates.shape == (32, 2)
        assert (task.candidates[0::2, 0] == task.candidates[1::2, 1]).all()  # the pair swaps its answers


def test_an_inexpressible_task_names_its_token(small_dataset):
    tokenizer = small_dataset.dataset.tokenizer()  # vocab 512 from a small corpus: ` range` is no token
    with pytest.raises(TaskError, match=r"candidate\(s\) ' (range|enumerate)'"):
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
            logits = model(torch.tensor([prompt]))[0, -1]
            pair = torch.stack([logits[good], logits[bad]])
            losses.append(-F.log_softmax(pair, dim=0)[0])
            hits.append(float(logits[good] > logits[bad]))
    assert scores["loss"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)
    assert scores["accuracy"] == pytest.approx(sum(hits) / len(hits))


def _constant(rng, v):
    """the same pair every draw, whose prompts end in different tokens"""
    return TaskPair(("x = 1\nif x", "x = 1\nwhile"), (" ==", " True"))


def _varied(rng, v):
    """a fresh name from the split's half every draw, both prompts ending in the same token"""
    x = rng.choice(v.names)
    return TaskPair((f"if {x}", f"for {x}"), (":", " in"))


def test_task_check_measures_the_generator_rules(small_dataset):
    tokenizer = small_dataset.dataset.tokenizer()
    constant = check_task(Task("constant", "", _constant), tokenizer, pairs=16)
    assert (constant.distinct_train, constant.distinct_test, constant.overlap) == (2, 2, 2)  # test = train
    assert constant.same_last_token == 0.0 and not constant.direct_path
    varied = check_task(Task("varied", "", _varied, direct_path=True), tokenizer, pairs=64)
    half = len(split_vocab("train").names)
    assert varied.distinct_train == 2 * half and varied.overlap == 0  # the splits draw from disjoint names
    assert varied.same_last_token == 1.0 and varied.direct_path
    assert check_task(TASKS["enumerate_range"], tokenizer, pairs=8).candidates.startswith("task enumerate_range")
    assert TASKS["else_elif"].direct_path and not TASKS["for_while"].direct_path


def test_tasks_verb_prints_a_row_per_task_and_a_json_line(small_corpus, tmp_path, capsys):
    args = [f"data.sources=[{small_corpus}]", f"data.cache_dir={tmp_path}", "data.vocab_size=512",
            "data.val_fraction=0.2", "prune.tasks=[while_return_true, for_while]"]
    assert main(["tasks", "--no-progress", "--pairs", "32", *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].startswith("while_return_true") and lines[2].startswith("for_while")
    figures = json.loads(lines[-1])["tasks"]
    assert list(figures) == ["while_return_true", "for_while"]
    assert figures["while_return_true"] == {"distinct_train": 2, "distinct_test": 2, "overlap": 2,
                                            "same_last_token": 1.0, "direct_path": False}
    assert main(["tasks", "--pairs", "0", *args]) == 2
