"""The task suite (METHOD.md section 5): 20 binary next-token tasks on Python code.

Each datapoint is a pair of prompts that differ only in a cue; prompt i's correct next token is
`answers[i]` and the other prompt's answer is its alternative. A task's loss is the binary
cross-entropy over its two candidate tokens at the last position, per sequence.

Generators are ours (the paper's templates are unpublished). They draw names and values from word
lists split in two halves, so train and held-out test prompts share no names; templates vary
(indentation, surrounding statements, literals). Candidates are checked against the tokenizer: each
must be the single token that follows the prompt when prompt + candidate is tokenized (so the model
saw that token in that place in pretraining). A task that cannot be expressed under a tokenizer is
reported with the offending token; the others still run. Where the regex glues punctuation to a
following newline (`)\n`, `):\n`), the prompt stops before the punctuation so both candidates are
natural tokens; each generator's docstring says what its pair tests.
"""

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

# Identifiers that are single tokens, with and without a leading space, under the default (stdlib)
# tokenizer, so the tasks whose answer is a name can be scored there.
NAMES = ["count", "value", "result", "data", "node", "key", "name", "size", "line", "text", "path", "user", "state",
         "error", "args", "obj", "func", "msg", "res", "out", "end", "code", "file", "lines", "header", "module",
         "config", "context"]
FUNCS = ["load", "parse", "update", "build", "check", "render", "format", "process", "compute", "handle",
         "read", "write", "send", "fetch", "create", "merge", "split", "apply", "clean", "store"]
WORDS = ["hello", "world", "spam", "eggs", "yes", "no", "ready", "done", "error", "start", "stop", "left",
         "right", "open", "close", "red", "green", "blue", "north", "south"]
FILES = {"r": ["input", "settings", "notes", "readme", "words", "table", "inbox", "sample"],
         "w": ["output", "report", "log", "dump", "backup", "export", "summary", "outbox"]}


@dataclass(frozen=True)
class TaskPair:
    prompts: tuple[str, str]
    answers: tuple[str, str]  # answers[i] is prompt i's correct next token; the other is its alternative


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    generate: Callable[[random.Random, "Vocab"], TaskPair]
    direct_path: bool = False  # solvable from the last token alone by nature (METHOD.md 8): never in a ratio


@dataclass(frozen=True)
class Vocab:
    """The half of the word lists one split draws from (train: first halves, test: second halves)."""

    names: list[str]
    funcs: list[str]
    words: list[str]
    files: dict[str, list[str]]  # file stems that suggest reading ("r") or writing ("w")

    def pick(self, rng: random.Random, k: int = 1) -> list[str]:
        return rng.sample(self.names, k)


def split_vocab(split: str) -> Vocab:
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    half = (lambda xs: xs[: len(xs) // 2]) if split == "train" else (lambda xs: xs[len(xs) // 2 :])
    return Vocab(names=half(NAMES), funcs=half(FUNCS), words=half(WORDS),
                 files={mode: half(stems) for mode, stems in FILES.items()})


def _indent(rng: random.Random) -> str:
    return rng.choice(["", "    "])


def _filler(rng: random.Random, v: Vocab, pad: str) -> str:
    a, b = v.pick(rng, 2)
    return rng.choice([f"{pad}{a} = {rng.randint(0, 99)}\n", f"{pad}print({a})\n", f"{pad}{a} = {b} + 1\n", ""])


def single_double_quote(rng, v):
    """close a string with ') or ") given the opening quote"""
    x, f, w = rng.choice(v.names), rng.choice(v.funcs), rng.choice(v.words)
    pad = _indent(rng)
    head = _filler(rng, v, pad) + f"{pad}{x} = {f}("
    return TaskPair((f"{head}'{w}", f'{head}"{w}'), ("')", '")'))


def final_kwarg(rng, v):
    """after an earlier keyword argument the next parameter needs a default (=); else the header may close"""
    f = rng.choice(v.funcs)
    a, b, c = v.pick(rng, 3)
    return TaskPair((f"def {f}({a}, {b}=None, {c}", f"def {f}({a}, {b}, {c}"), ("=", "):\n"))


def _set_or_string(rng, v, name):
    pad = _indent(rng)
    other = rng.choice([n for n in v.names if n != name])
    body = f"{pad}for {other} in range({rng.randint(2, 9)}):\n{pad}    {name}"
    return TaskPair((f"{pad}{name} = set()\n{body}", f'{pad}{name} = ""\n{body}'), (".add", " +="))


def set_or_string(rng, v):
    """.add vs += on a variable first set to set() or \"\""""
    return _set_or_string(rng, v, rng.choice(v.names))


def set_or_string_fixedvarname(rng, v):
    """the same, the variable always named current"""
    return _set_or_string(rng, v, "current")


def class_init(rng, v):
    """copy the right name after self.x = in a run of self.a = a lines"""
    cls = rng.choice(v.funcs).capitalize() + "Config"
    a, b, c = v.pick(rng, 3)
    head = f"class {cls}:\n    def __init__(self, {a}, {b}, {c}):\n        self.{a} = {a}\n"
    return TaskPair((f"{head}        self.{b} =", f"{head}        self.{c} ="), (f" {b}", f" {c}"))


def with_as(rng, v):
    """with open(...) goes on to ` as` (the call closes with a plain `)`); an assignment ends the line"""
    x, p = v.pick(rng, 2)
    pad = _indent(rng)
    return TaskPair((f"{pad}with open({p}", f"{pad}{x} = open({p}"), (")", ")\n"))


def bracket_brace(rng, v):
    """: inside a dict literal vs , inside a list literal"""
    x, w1 = rng.choice(v.names), rng.choice(v.words)
    return TaskPair((f"{x} = {{'{w1}", f"{x} = ['{w1}"), ("':", "',"))


def with_open(rng, v):
    """'r' vs 'w' from the file's name"""
    r, w = rng.choice(v.files["r"]), rng.choice(v.files["w"])
    return TaskPair((f"with open('{r}.txt', '", f"with open('{w}.txt', '"), ("r", "w"))


def bracket_counting(rng, v):
    """] vs ]] from list nesting depth"""
    x = rng.choice(v.names)
    items = ", ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(1, 4)))
    return TaskPair((f"{x} = [{items}", f"{x} = [[{items}"), ("]\n", "]]\n"))


def for_while(rng, v):
    """ in after `for x` vs : after `while x`"""
    x = rng.choice(v.names)
    pad = _indent(rng)
    head = _filler(rng, v, pad)
    return TaskPair((f"{head}{pad}for {x}", f"{head}{pad}while {x}"), (" in", ":\n"))


def else_elif(rng, v):
    """: after else vs a condition after elif (solvable by bigram statistics alone; METHOD.md 8)"""
    x = rng.choice(v.names)
    head = f"if {x} > {rng.randint(0, 9)}:\n    print({x})\n"
    return TaskPair((f"{head}else", f"{head}elif"), (":\n", f" {x}"))


def fstring_brace(rng, v):
    """inside an f-string a name follows {; in a plain (format) string the brace closes at once"""
    x, y = v.pick(rng, 2)
    return TaskPair((f"{y} = f'{{", f"{y} = '{{"), (x, "}"))


def if_ternary(rng, v):
    """an if statement's condition is followed by : ; a ternary's by else"""
    x, y = v.pick(rng, 2)
    return TaskPair((f"if {x}", f"{y} = {rng.randint(0, 9)} if {x}"), (":\n", " else"))


def var_swap(rng, v):
    """predict the first name again in x, y = y, x"""
    x, y = v.pick(rng, 2)
    return TaskPair((f"{x}, {y} = {y},", f"{y}, {x} = {x},"), (f" {x}", f" {y}"))


def indent_for(rng, v):
    """the right indentation after a for line, from the depth of the for"""
    x, y = v.pick(rng, 2)
    outer = f"def {rng.choice(v.funcs)}({y}):\n"
    return TaskPair((f"{outer}    for {x} in {y}:\n", f"{outer}    if {y}:\n        for {x} in {y}:\n"),
                    ("        ", "            "))


def lambda_func(rng, v):
    """: after `x = lambda f` vs ( after `def f`"""
    x, f = rng.choice(v.names), rng.choice(v.funcs)
    return TaskPair((f"{x} = lambda {f}", f"def {f}"), (":", "("))


def if_equals(rng, v):
    """ == in an if condition vs = in an assignment"""
    x = rng.choice(v.names)
    pad = _indent(rng)
    return TaskPair((f"{pad}if {x}", f"{pad}{x}"), (" ==", " ="))


def enumerate_range(rng, v):
    """enumerate for a loop over two variables vs range for one"""
    i, x = v.pick(rng, 2)
    return TaskPair((f"for {i}, {x} in", f"for {i} in"), (" enumerate", " range"))


def var_if(rng, v):
    """after `if x ==` comes True and a colon; after `x =` True and a newline"""
    x = rng.choice(v.names)
    return TaskPair((f"if {x} == True", f"{x} = True"), (":\n", "\n"))


def while_return_true(rng, v):
    """: after while True vs a newline after return True"""
    pad = "    "
    return TaskPair((f"{pad}while True", f"{pad}return True"), (":\n", "\n"))


DIRECT_PATH = {"else_elif"}  # the pair's last tokens differ by the task's nature (METHOD.md 8)

TASKS: dict[str, Task] = {
    fn.__name__: Task(fn.__name__, (fn.__doc__ or "").strip(), fn, direct_path=fn.__name__ in DIRECT_PATH)
    for fn in (single_double_quote, final_kwarg, set_or_string, set_or_string_fixedvarname, class_init, with_as,
               bracket_brace, with_open, bracket_counting, for_while, else_elif, fstring_brace, if_ternary,
               var_swap, indent_for, lambda_func, if_equals, enumerate_range, var_if, while_return_true)
}


class TaskError(ValueError):
    """A task cannot be expressed under this tokenizer (a candidate is not one natural token)."""


@dataclass(frozen=True)
class EncodedTask:
    name: str
    prompts: list[list[int]]  # token ids of every sequence (two per pair)
    candidates: torch.Tensor  # (sequences, 2): [correct token id, alternative token id]


def encode_task(task: Task, tokenizer: Tokenizer, *, split: str, pairs: int, seed: int = 0) -> EncodedTask:
    """Draw `pairs` pairs whose candidates are single, natural next tokens; TaskError if most draws fail."""
    rng, vocab = random.Random(f"{task.name}/{split}/{seed}"), split_vocab(split)
    prompts, candidates, failures = [], [], {}
    for _ in range(pairs * 10):
        if len(prompts) >= 2 * pairs:
            break
        pair = task.generate(rng, vocab)
        ids = [_answer_id(tokenizer, p, a, failures) for p, a in zip(pair.prompts, pair.answers, strict=True)]
        if None in ids:
            continue
        for i, prompt in enumerate(pair.prompts):
            prompts.append(tokenizer.encode(prompt, add_special_tokens=False).ids)
            candidates.append([ids[i], ids[1 - i]])
    if len(prompts) < pairs:  # fewer than half the pairs asked for
        worst = ", ".join(repr(c) for c in sorted(failures, key=failures.get, reverse=True)[:4])
        raise TaskError(f"task {task.name}: candidate(s) {worst} are not single natural tokens under this "
                        "tokenizer (add them to data.required_tokens)")
    return EncodedTask(task.name, prompts[: 2 * pairs], torch.tensor(candidates[: 2 * pairs]))


def _answer_id(tokenizer: Tokenizer, prompt: str, answer: str, failures: dict) -> int | None:
    head = tokenizer.encode(prompt, add_special_tokens=False).ids
    whole = tokenizer.encode(prompt + answer, add_special_tokens=False).ids
    if len(whole) != len(head) + 1 or whole[: len(head)] != head:
        failures[answer] = failures.get(answer, 0) + 1
        return None
    return whole[-1]


def check_task_names(names: Iterable[str]) -> None:
    """ValueError naming `prune.tasks` (where task names come from) if a name is not in the suite."""
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"prune.tasks: unknown task(s) {unknown}; known: {', '.join(TASKS)}")


def encode_suite(tokenizer: Tokenizer, names: list[str] | None, *, split: str, pairs: int, seed: int = 0
                 ) -> tuple[dict[str, EncodedTask], dict[str, str]]:
    """Every named task (all if `names` is empty or None); failures map task -> message."""
    check_task_names(names or [])
    encoded, failures = {}, {}
    for name in names or list(TASKS):
        try:
            encoded[name] = encode_task(TASKS[name], tokenizer, split=split, pairs=pairs, seed=seed)
        except TaskError as err:
            failures[name] = str(err)
    return encoded, failures


@torch.no_grad()
def task_scores(model: torch.nn.Module, task: EncodedTask, *, pad_id: int, context_length: int,
                device: str | torch.device = "cpu", batch_size: int = 64) -> dict[str, float]:
    """Binary cross-entropy over the two candidates at the last position, per sequence, and accuracy."""
    losses, correct = [], []
    for start in range(0, len(task.prompts), batch_size):
        logits = last_logits(model, task.prompts[start : start + batch_size], pad_id, context_length, device)
        pair = logits.gather(1, task.candidates[start : start + batch_size].to(device))  # (B, 2)
        losses.append(pair_loss(pair))
        correct.append(pair[:, 0] > pair[:, 1])
    return {"loss": torch.cat(losses).mean().item(), "accuracy": torch.cat(correct).float().mean().item()}


def pair_loss(pair: torch.Tensor) -> torch.Tensor:
    """The task loss of each sequence (METHOD.md 5): binary cross-entropy over its two candidates' logits
    `pair` (sequences, 2) = [correct, alternative], i.e. -log softmax(pair)[correct]; shape (sequences,)."""
    return -F.log_softmax(pair.float(), dim=-1)[:, 0]


def last_logits(model: torch.nn.Module, prompts: list[list[int]], pad_id: int, context_length: int,
                device: str | torch.device) -> torch.Tensor:
    """Logits at each prompt's last token: right-padded (causal attention never sees the padding),
    left-truncated to the context."""
    batch, lengths = pad_prompts(prompts, context_length, pad_id)
    logits = model(batch.to(device))  # (B, T, V)
    last = torch.tensor([n - 1 for n in lengths], device=device)
    return logits[torch.arange(len(lengths), device=device), last]  # (B, V)


def pad_prompts(prompts: list[list[int]], context_length: int, fill: int) -> tuple[torch.Tensor, list[int]]:
    """Prompts left-truncated to the context and right-padded with `fill` into one (B, T) batch, and
    each prompt's length in it."""
    cut = [p[-context_length:] for p in prompts]
    batch = torch.full((len(cut), max(len(p) for p in cut)), fill, dtype=torch.long)
    for i, p in enumerate(cut):
        batch[i, : len(p)] = torch.tensor(p)
    return batch, [len(p) for p in cut]


@dataclass(frozen=True)
class TaskCheck:
    """What `circuitscale tasks` reports of one task's generator under one tokenizer (issue: honest tasks).

    distinct_train / distinct_test: distinct prompts among the sequences drawn for each split;
    overlap: distinct test prompts that also occur among the train prompts (held-out is not held out);
    same_last_token: fraction of pairs whose two prompts end in the same token (the paper's design: the
    cue is earlier in the prompt, so the last token alone cannot tell the answer);
    candidates: "ok", or the TaskError message when the candidates are not single natural tokens at the
    end of the prompt (a check at the end of the string only, not inside a realistic continuation).
    """

    name: str
    distinct_train: int
    distinct_test: int
    overlap: int
    same_last_token: float
    direct_path: bool
    candidates: str


def check_task(task: Task, tokenizer: Tokenizer, *, pairs: int, seed: int = 0) -> TaskCheck:
    """Draw `pairs` pairs of each split the way `encode_task` does and measure the generator's rules."""
    prompts: dict[str, list[str]] = {}
    same = []
    for split in ("train", "test"):
        rng, vocab = random.Random(f"{task.name}/{split}/{seed}"), split_vocab(split)
        drawn = [task.generate(rng, vocab) for _ in range(pairs)]
        prompts[split] = [p for pair in drawn for p in pair.prompts]
        for pair in drawn:
            ends = [tokenizer.encode(p, add_special_tokens=False).ids[-1:] for p in pair.prompts]
            same.append(ends[0] == ends[1])
    try:
        encode_task(task, tokenizer, split="train", pairs=pairs, seed=seed)
        candidates = "ok"
    except TaskError as err:
        candidates = str(err)
    train, test = set(prompts["train"]), set(prompts["test"])
    return TaskCheck(name=task.name, distinct_train=len(train), distinct_test=len(test), overlap=len(test & train),
                     same_last_token=sum(same) / len(same), direct_path=task.direct_path, candidates=candidates)
