"""The task suite (METHOD.md section 5): 20 binary next-token tasks on Python code.

Each datapoint is a pair of prompts that differ only in a cue; prompt i's correct next token is
`answers[i]` and the other prompt's answer is its alternative. A task's loss is the binary
cross-entropy over its two candidate tokens at the last position, per sequence.

Generators are ours (the paper's templates are unpublished). Rules every generator keeps (tests check
each, under the default tokenizer and the `cpu` one):

1. The two prompts of a pair differ only in the cue and end in the same token, so the last token alone
   cannot tell the answer (the paper's design). The exception is a task that is direct-path by nature
   (`else_elif`, marked in DIRECT_PATH).
2. The cue sits in generated surrounding code (`_scene`: assignments, calls, prints, comments, small
   if/for/while blocks, an enclosing def/method/loop giving nesting depth), so a split of 256 pairs
   holds over 200 distinct pairs. Names, function names, words and file stems come from word lists split
   in two halves (`split_vocab`): train and held-out test prompts share none, so no test prompt occurs
   among the train prompts. Prompts stay short (at most about 80 tokens) for a 128-token context.
3. Candidates are natural: each pair carries the code that follows each answer (`follows`), and a
   candidate is accepted only where tokenizing prompt + answer + follow gives exactly the prompt's
   tokens and then the candidate as one token (`_answer_id`), i.e. the token the tokenizer really
   produces there. The pre-tokenization regex glues punctuation to a following newline (`)\\n`, `):\\n`,
   `]]\\n`) and a letter run to one preceding symbol (`=None`, `.add`, `(x`), so the follow decides which
   token is natural; a draw whose candidate is not is dropped (`circuitscale tasks` reports how many).
"""

import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

# Identifiers that are single tokens, with and without a leading space, under the default (stdlib)
# tokenizer and the `cpu` one (stdlib + idioms), so the tasks whose answer is a name can be scored there.
NAMES = ["count", "value", "result", "data", "node", "key", "name", "size", "line", "text", "path", "url", "state",
         "error", "args", "obj", "method", "msg", "attr", "out", "end", "code", "file", "lines", "header", "module",
         "version", "context"]
FUNCS = ["load", "parse", "update", "build", "check", "render", "format", "process", "compute", "handle",
         "read", "write", "send", "fetch", "create", "merge", "split", "apply", "clean", "store"]
WORDS = ["hello", "world", "spam", "eggs", "yes", "no", "ready", "done", "start", "stop", "left", "right", "up",
         "down", "red", "green", "blue", "north", "south", "east"]
FILES = {"r": ["input", "settings", "notes", "readme", "words", "table", "inbox", "sample"],
         "w": ["output", "report", "log", "dump", "backup", "export", "summary", "outbox"]}


@dataclass(frozen=True)
class TaskPair:
    prompts: tuple[str, str]
    answers: tuple[str, str]  # answers[i] is prompt i's correct next token; the other is its alternative
    follows: tuple[str, str]  # the code after each answer in a realistic continuation (decides the tokens)


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


# --- the context writer: code around a task's cue ---------------------------------------------------------

IN = "    "  # one indentation level


def _statement(rng: random.Random, v: Vocab, pad: str, avoid: Iterable[str] = (), *, comment: bool = True) -> str:
    """One simple statement at indentation `pad` (an assignment, a call, a print, or a comment unless it must
    be code, e.g. a block's only line), naming none of `avoid`."""
    a, b = rng.sample([n for n in v.names if n not in avoid], 2)
    f, w, n = rng.choice(v.funcs), rng.choice(v.words), rng.randint(0, 99)
    return pad + rng.choice([
        f"{a} = {n}", f"{a} = {b} + {n}", f"{a} = {f}({b})", f"{f}({a}, {n})", f"print({a})",
        f"print('{w}', {a})", f"{a} = '{w}'", f"{a} = [{b}, {n}]", f"{a}.append({b})",
        f"{a} += {n}", f"{a} = {b}[{n % 10}]", f"{a} = len({b})", f"{a} = {b} * {n}",
    ] + ([f"# {f} the {a}"] if comment else [])) + "\n"


def _condition(rng: random.Random, v: Vocab, avoid: Iterable[str] = ()) -> str:
    a, b = rng.sample([n for n in v.names if n not in avoid], 2)
    return rng.choice([f"{a} > {rng.randint(0, 99)}", f"not {a}", f"{a} in {b}", f"{a} == '{rng.choice(v.words)}'",
                       f"{a} < {b}", f"{a}"])


def _block(rng: random.Random, v: Vocab, pad: str, avoid: Iterable[str] = ()) -> str:
    """An if, for or while header at `pad` and one statement in its body."""
    a, b = rng.sample([n for n in v.names if n not in avoid], 2)
    head = rng.choice([f"if {_condition(rng, v, avoid)}:", f"for {a} in {b}:",
                       f"for {a} in range({rng.randint(2, 9)}):", f"while {a} < {rng.randint(2, 99)}:"])
    return f"{pad}{head}\n" + _statement(rng, v, pad + IN, avoid, comment=False)


def _context(rng: random.Random, v: Vocab, pad: str, count: int, avoid: Iterable[str] = ()) -> str:
    """`count` random statements at `pad`; about one in four is a small block (a level deeper)."""
    return "".join(_block(rng, v, pad, avoid) if rng.random() < 0.25 else _statement(rng, v, pad, avoid)
                   for _ in range(count))


def _class_name(rng: random.Random, v: Vocab) -> str:
    return rng.choice(v.funcs).capitalize() + rng.choice(["Job", "Tool", "Step", "Config", "Record"])


FRAMES = ("module", "def", "method", "for", "if")


def _scene(rng: random.Random, v: Vocab, avoid: Iterable[str] = (), frames: Iterable[str] = FRAMES
           ) -> tuple[str, str]:
    """Code that precedes a task's cue, and the indentation at the cue: maybe a module-level statement,
    maybe an enclosing def, method, loop or if (one of `frames`), then one or two statements at the
    cue's level. It always names at least one word of its split (so train and test never share it)."""
    frame = rng.choice(list(frames))
    text = _context(rng, v, "", rng.randint(0, 1), avoid)
    a, b = rng.sample([n for n in v.names if n not in avoid], 2)
    pad = IN
    if frame == "module":
        pad = ""
    elif frame == "def":
        text += f"def {rng.choice(v.funcs)}({a}):\n"
    elif frame == "method":
        text += f"class {_class_name(rng, v)}:\n{IN}def {rng.choice(v.funcs)}(self, {a}):\n"
        pad = IN * 2
    elif frame == "for":
        text += f"for {a} in {b}:\n"
    else:
        text += f"if {_condition(rng, v, avoid)}:\n"
    return text + _context(rng, v, pad, rng.randint(1, 2), avoid), pad


def _body(rng: random.Random, v: Vocab, pad: str, avoid: Iterable[str] = ()) -> str:
    """A follow: the first line of a block's body (after an answer ending in `:\\n`)."""
    return _statement(rng, v, pad + IN, avoid, comment=False)


# --- the twenty generators ---------------------------------------------------------------------------------

def single_double_quote(rng, v):
    """close a string with ') or ") given the opening quote (the call goes on, so `')` is not glued to a newline)"""
    x, y = v.pick(rng, 2)
    f, w = rng.choice(v.funcs), rng.choice(v.words)
    head, pad = _scene(rng, v, avoid=(x, y))
    site, follow = rng.choice([(f"{pad}{x} = {f}(", f" + {y}\n"), (f"{pad}if {f}(", f" in {y}:\n{_body(rng, v, pad)}"),
                               (f"{pad}{x} = {y} or {f}(", f" * {rng.randint(2, 9)}\n")])
    return TaskPair((f"{head}{site}'{w}", f'{head}{site}"{w}'), ("')", '")'), (follow, follow))


def final_kwarg(rng, v):
    """after an earlier keyword argument the next parameter needs a default (=None); else the header may
    close with ):\\n (a function at module level, or a method after a class attribute or another method)"""
    f = rng.choice(v.funcs)
    names = v.pick(rng, rng.randint(3, 4))
    *before, b, c = names
    head = _context(rng, v, "", rng.randint(1, 3), avoid=names)
    pad = ""
    if rng.random() < 0.5:
        a = rng.choice([n for n in v.names if n not in names])
        other = rng.choice([g for g in v.funcs if g != f])
        head += f"class {_class_name(rng, v)}:\n" + rng.choice([
            f"{IN}{a} = {rng.randint(0, 99)}\n", f"{IN}def {other}(self):\n{IN * 2}return self.{a}\n"])
        pad, before = IN, ["self", *before]
    params = "".join(f"{p}, " for p in before)
    body = _body(rng, v, pad, avoid=names)
    return TaskPair((f"{head}{pad}def {f}({params}{b}=None, {c}", f"{head}{pad}def {f}({params}{b}, {c}"),
                    ("=None", "):\n"), ("):\n" + body, body))


def _set_or_string(rng, v, name):
    other = rng.choice([n for n in v.names if n != name])
    head, pad = _scene(rng, v, avoid=(name, other))
    source = rng.choice([f"range({rng.randint(2, 9)})", rng.choice([n for n in v.names if n not in (name, other)])])
    between = _statement(rng, v, pad, avoid=(name, other)) if rng.random() < 0.5 else ""
    body = f"{between}{pad}for {other} in {source}:\n{pad}{IN}{name}"
    return TaskPair((f"{head}{pad}{name} = set()\n{body}", f'{head}{pad}{name} = ""\n{body}'), (".add", " +="),
                    (f"({other})\n", f" str({other})\n"))


def set_or_string(rng, v):
    """.add vs += on a variable first set to set() or \"\""""
    return _set_or_string(rng, v, rng.choice(v.names))


def set_or_string_fixedvarname(rng, v):
    """the same, the variable always named current"""
    return _set_or_string(rng, v, "current")


def class_init(rng, v):
    """copy the right name after self.x = in a run of self.a = a lines"""
    cls = _class_name(rng, v)
    params = v.pick(rng, rng.randint(3, 5))
    done = rng.randint(1, len(params) - 2)
    b, c = rng.sample(params[done:], 2)
    head = _context(rng, v, "", rng.randint(1, 2), avoid=params)
    head += f"class {cls}:\n{IN}def __init__(self, {', '.join(params)}):\n"
    head += "".join(f"{IN * 2}self.{p} = {p}\n" for p in params[:done])
    return TaskPair((f"{head}{IN * 2}self.{b} =", f"{head}{IN * 2}self.{c} ="), (f" {b}", f" {c}"),
                    (f"\n{IN * 2}self.{c} = {c}\n", f"\n{IN * 2}self.{b} = {b}\n"))


def with_as(rng, v):
    """with open(...) goes on to ` as` (the call closes with a plain `)`); an assignment ends the line ()\\n)"""
    x, p = v.pick(rng, 2)
    head, pad = _scene(rng, v, avoid=(x, p))
    return TaskPair((f"{head}{pad}with open({p}", f"{head}{pad}{x} = open({p}"), (")", ")\n"),
                    (f" as {x}:\n{pad}{IN}print({x})\n", f"{pad}print({x})\n"))


def bracket_brace(rng, v):
    """: inside a dict literal vs , inside a list literal (after a string key or item)"""
    x = rng.choice(v.names)
    w1, w2 = rng.sample(v.words, 2)
    head, pad = _scene(rng, v, avoid=(x,))
    site, close = rng.choice([(f"{pad}{x} = ", "\n"), (f"{pad}{rng.choice(v.funcs)}(", ")\n")])
    n = rng.randint(0, 99)
    return TaskPair((f"{head}{site}{{'{w1}", f"{head}{site}['{w1}"), ("':", "',"),
                    (f" {n}}}{close}", f" '{w2}']{close}"))


def with_open(rng, v):
    """'r' vs 'w' from the file's name (input, notes, ... vs output, report, ...)"""
    r, w = rng.choice(v.files["r"]), rng.choice(v.files["w"])
    x = rng.choice(v.names)
    head, pad = _scene(rng, v, avoid=(x,))
    ext = rng.choice(["txt", "csv", "dat", "json"])
    follow = f"') as {x}:\n{pad}{IN}print({x})\n"
    return TaskPair((f"{head}{pad}with open('{r}.{ext}', '", f"{head}{pad}with open('{w}.{ext}', '"), ("r", "w"),
                    (follow, follow))


def bracket_counting(rng, v):
    """]\\n vs ]]\\n from list nesting depth"""
    x = rng.choice(v.names)
    head, pad = _scene(rng, v, avoid=(x,))
    pool = [n for n in v.names if n != x]
    items = ", ".join(str(rng.randint(0, 99)) if rng.random() < 0.7 else rng.choice(pool)
                      for _ in range(rng.randint(1, 4)))
    after = _statement(rng, v, pad, avoid=(x,))
    return TaskPair((f"{head}{pad}{x} = [{items}", f"{head}{pad}{x} = [[{items}"), ("]\n", "]]\n"), (after, after))


def for_while(rng, v):
    """ in after `for x` vs :\\n after `while x`"""
    x, y = v.pick(rng, 2)
    head, pad = _scene(rng, v, avoid=(x, y))
    body = _body(rng, v, pad, avoid=(x, y))
    return TaskPair((f"{head}{pad}for {x}", f"{head}{pad}while {x}"), (" in", ":\n"), (f" {y}:\n{body}", body))


def else_elif(rng, v):
    """:\\n after else vs a condition after elif. Direct-path by nature: the prompts end in `else` and `elif`
    (rule 1 cannot hold; solvable by bigram statistics alone; METHOD.md 8)"""
    x = rng.choice(v.names)
    head, pad = _scene(rng, v, avoid=(x,))
    head += f"{pad}if {x} > {rng.randint(0, 49)}:\n" + _statement(rng, v, pad + IN, avoid=(x,), comment=False)
    body = _body(rng, v, pad, avoid=(x,))
    return TaskPair((f"{head}{pad}else", f"{head}{pad}elif"), (":\n", f" {x}"),
                    (body, f" < {rng.randint(50, 99)}:\n{body}"))


def fstring_brace(rng, v):
    """whether a string is an f-string: there ` {` opens a field a name follows; in a plain string (later
    .format-ted) the field is empty, ` {}` (one token: the regex glues `{}`, so the prompt stops before it)"""
    x, y = v.pick(rng, 2)
    w1, w2, w3 = rng.sample(v.words, 3)
    head, pad = _scene(rng, v, avoid=(x, y))
    text = rng.choice([f"{w1} {w2}", f"{w1}:", f"{w1} ="])
    site, close = rng.choice([(f"{pad}{y} = ", "\n"), (f"{pad}print(", ")\n")])
    return TaskPair((f"{head}{site}f'{text}", f"{head}{site}'{text}"), (" {", " {}"),
                    (f"{x}}} {w3}'{close}", f" {w3}'.format({x}){close}"))


def if_ternary(rng, v):
    """an if statement's condition is followed by :\\n ; a ternary's by else"""
    x, y = v.pick(rng, 2)
    head, pad = _scene(rng, v, avoid=(x, y))
    value = rng.choice([str(rng.randint(0, 99)), f"'{rng.choice(v.words)}'", rng.choice(v.names)])
    return TaskPair((f"{head}{pad}if {x}", f"{head}{pad}{y} = {value} if {x}"), (":\n", " else"),
                    (_body(rng, v, pad, avoid=(x, y)), f" {rng.randint(0, 99)}\n"))


def var_swap(rng, v):
    """predict the first name again in x, y = y, x"""
    x, y = v.pick(rng, 2)
    head, pad = _scene(rng, v, avoid=(x, y))
    after = "\n" + _statement(rng, v, pad)
    return TaskPair((f"{head}{pad}{x}, {y} = {y},", f"{head}{pad}{y}, {x} = {x},"), (f" {x}", f" {y}"),
                    (after, after))


def indent_for(rng, v):
    """the right indentation after a for line, from the depth of the for (after an if block, or inside it).
    The regex gives a body line's indentation as (width - 1) spaces then ` name`, so the candidates are the
    3/7/11-space tokens after the for line's `:\\n`"""
    x, y = v.pick(rng, 2)
    head, pad = _scene(rng, v, avoid=(x, y), frames=("module", "def", "for", "if"))
    head += f"{pad}if {_condition(rng, v, avoid=(x, y))}:\n" + _statement(rng, v, pad + IN, avoid=(x, y), comment=False)
    loop = f"for {x} in {y}:\n"
    follow = rng.choice([f" print({x})\n", f" {rng.choice(v.funcs)}({x})\n", f" {y} = {x}\n"])
    return TaskPair((f"{head}{pad}{loop}", f"{head}{pad}{IN}{loop}"),
                    (" " * (len(pad) + 3), " " * (len(pad) + 7)), (follow, follow))


def lambda_func(rng, v):
    """:  after `x = lambda f` vs ( after `def f`. `(` is natural only where the first parameter's name does
    not merge with it (`(x`, `(self` are single tokens): draws where it does are dropped"""
    x, a = v.pick(rng, 2)
    f = rng.choice(v.funcs + [n for n in v.names if n not in (x, a)])
    head, pad = _scene(rng, v, avoid=(x, a, f))
    return TaskPair((f"{head}{pad}{x} = lambda {f}", f"{head}{pad}def {f}"), (":", "("),
                    (f" {f} * {rng.randint(2, 9)}\n", f"{a}):\n{pad}{IN}return {a}\n"))


def if_equals(rng, v):
    """ == in an if condition vs = in an assignment (always indented, so both prompts end in ` x`)"""
    x = rng.choice(v.names)
    head, pad = _scene(rng, v, avoid=(x,), frames=("def", "method", "for", "if"))
    value = rng.choice([str(rng.randint(0, 99)), f"'{rng.choice(v.words)}'",
                        rng.choice([n for n in v.names if n != x])])
    return TaskPair((f"{head}{pad}if {x}", f"{head}{pad}{x}"), (" ==", " ="),
                    (f" {value}:\n{_body(rng, v, pad, avoid=(x,))}", f" {value}\n"))


def enumerate_range(rng, v):
    """enumerate for a loop over two variables vs range for one"""
    i, x, y = v.pick(rng, 3)
    head, pad = _scene(rng, v, avoid=(i, x, y))
    body = _body(rng, v, pad, avoid=(i, x, y))
    return TaskPair((f"{head}{pad}for {i}, {x} in", f"{head}{pad}for {i} in"), (" enumerate", " range"),
                    (f"({y}):\n{body}", f"(len({y})):\n{body}"))


def var_if(rng, v):
    """after `if x == True` comes :\\n; after `x = True` a newline (the next statement follows)"""
    x = rng.choice(v.names)
    head, pad = _scene(rng, v, avoid=(x,))
    return TaskPair((f"{head}{pad}if {x} == True", f"{head}{pad}{x} = True"), (":\n", "\n"),
                    (_body(rng, v, pad, avoid=(x,)), _statement(rng, v, pad, avoid=(x,))))


def while_return_true(rng, v):
    """:\\n after while True vs a newline after return True (inside an if, so code follows the return)"""
    head, pad = _scene(rng, v, frames=("def", "method"))
    head += f"{pad}if {_condition(rng, v)}:\n"
    return TaskPair((f"{head}{pad}{IN}while True", f"{head}{pad}{IN}return True"), (":\n", "\n"),
                    (_body(rng, v, pad + IN), f"{pad}return False\n"))


DIRECT_PATH = {"else_elif"}  # the pair's last tokens differ by the task's nature (METHOD.md 8)

TASKS: dict[str, Task] = {
    fn.__name__: Task(fn.__name__, (fn.__doc__ or "").strip(), fn, direct_path=fn.__name__ in DIRECT_PATH)
    for fn in (single_double_quote, final_kwarg, set_or_string, set_or_string_fixedvarname, class_init, with_as,
               bracket_brace, with_open, bracket_counting, for_while, else_elif, fstring_brace, if_ternary,
               var_swap, indent_for, lambda_func, if_equals, enumerate_range, var_if, while_return_true)
}


class TaskError(ValueError):
    """A task cannot be expressed under this tokenizer: most draws have a candidate that is not one natural
    token there, or (not direct-path) prompts that end in different tokens."""


@dataclass(frozen=True)
class EncodedTask:
    name: str
    prompts: list[list[int]]  # token ids of every sequence (two per pair)
    candidates: torch.Tensor  # (sequences, 2): [correct token id, alternative token id]


def encode_task(task: Task, tokenizer: Tokenizer, *, split: str, pairs: int, seed: int = 0) -> EncodedTask:
    """Draw `pairs` pairs whose candidates are single, natural next tokens (`_answer_id`) and whose prompts
    end in the same token (unless the task is direct-path); other draws are dropped. TaskError if fewer than
    half the pairs asked for survive `10 * pairs` draws."""
    draws = _draw(task, tokenizer, split=split, pairs=pairs, seed=seed)
    if len(draws.prompts) < pairs:  # fewer than half the pairs asked for
        raise TaskError(f"task {task.name}: {draws.why()}")
    return EncodedTask(task.name, draws.prompts[: 2 * pairs], torch.tensor(draws.candidates[: 2 * pairs]))


@dataclass
class _Draws:
    """What `encode_task` drew: the kept sequences and why the other draws were dropped."""

    prompts: list[list[int]]
    candidates: list[list[int]]
    drawn: int = 0  # pairs drawn
    unnatural: Counter = field(default_factory=Counter)  # candidate -> draws dropped as it was not natural there
    mismatched: int = 0  # draws dropped because their two prompts end in different tokens
    texts: list[tuple[str, str]] = field(default_factory=list)  # every drawn pair's prompts, in order
    same: list[bool] = field(default_factory=list)  # whether each drawn pair's prompts end in the same token
    several: set[str] = field(default_factory=set)  # the unnatural candidates that are not even one token

    @property
    def dropped(self) -> int:
        return self.drawn - len(self.prompts) // 2

    def why(self) -> str:
        reasons = []
        worst = [c for c, _ in self.unnatural.most_common()]
        if several := [c for c in worst if c in self.several][:4]:
            reasons.append(f"candidate(s) {', '.join(map(repr, several))} are not single tokens under this tokenizer "
                           "(add them to data.required_tokens)")
        if glued := [c for c in worst if c not in self.several][:4]:
            reasons.append(f"candidate(s) {', '.join(map(repr, glued))} are not the next token there (the regex "
                           "glues them to the prompt's end or to the code that follows)")
        if self.mismatched:
            reasons.append(f"{self.mismatched} of {self.drawn} pairs' prompts end in different tokens")
        return "; ".join(reasons)


def _draw(task: Task, tokenizer: Tokenizer, *, split: str, pairs: int, seed: int) -> _Draws:
    rng, vocab = random.Random(f"{task.name}/{split}/{seed}"), split_vocab(split)
    draws = _Draws([], [])
    for _ in range(pairs * 10):
        if len(draws.prompts) >= 2 * pairs:
            break
        pair = task.generate(rng, vocab)
        heads = [_ids(tokenizer, p) for p in pair.prompts]
        draws.drawn += 1
        draws.texts.append(pair.prompts)
        draws.same.append(heads[0][-1:] == heads[1][-1:])
        ids = [_answer_id(tokenizer, *texts, head=head)
               for *texts, head in zip(pair.prompts, pair.answers, pair.follows, heads, strict=True)]
        for answer, token in zip(pair.answers, ids, strict=True):
            if token is None:
                draws.unnatural[answer] += 1
                if len(_ids(tokenizer, answer)) != 1:
                    draws.several.add(answer)
        if None in ids:
            continue
        if not task.direct_path and not draws.same[-1]:
            draws.mismatched += 1
            continue
        for i, head in enumerate(heads):
            draws.prompts.append(head)
            draws.candidates.append([ids[i], ids[1 - i]])
    return draws


def _ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def _answer_id(tokenizer: Tokenizer, prompt: str, answer: str, follow: str, head: list[int] | None = None
               ) -> int | None:
    """The answer's token id where it is the natural next token: tokenizing `prompt + answer + follow` (the
    prompt, the answer and the code that follows it) gives exactly the prompt's tokens, then the answer as
    one token. None where it is not (the answer is several tokens, or merges with the prompt's end or
    with what follows, e.g. `)` before a newline is `)\\n`). `head`: the prompt's token ids, if known."""
    token = _ids(tokenizer, answer)
    head = _ids(tokenizer, prompt) if head is None else head
    whole = _ids(tokenizer, prompt + answer + follow)
    if len(token) != 1 or whole[: len(head) + 1] != head + token:
        return None
    return token[0]


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
    same_last_token: fraction of drawn pairs whose two prompts end in the same token (the paper's design: the
    cue is earlier in the prompt, so the last token alone cannot tell the answer);
    candidates: "ok" when every draw of both splits is kept by `encode_task`, "ok (k of n draws dropped: ...)"
    when some are (a candidate that is not the natural next token inside its realistic continuation, see
    `_answer_id`, or prompts ending in different tokens), or the TaskError message when the task cannot be
    encoded under this tokenizer.
    """

    name: str
    distinct_train: int
    distinct_test: int
    overlap: int
    same_last_token: float
    direct_path: bool
    candidates: str


def check_task(task: Task, tokenizer: Tokenizer, *, pairs: int, seed: int = 0) -> TaskCheck:
    """Draw `pairs` pairs of each split the way `encode_task` does and measure the generator's rules: distinct
    prompts, train/test overlap and same last token over the raw draws, and the candidates (natural next
    tokens of prompt + answer + follow, as `encode_task` keeps them) over `encode_task`'s draws of both splits."""
    draws = [_draw(task, tokenizer, split=split, pairs=pairs, seed=seed) for split in ("train", "test")]
    train, test = ({p for pair in d.texts[:pairs] for p in pair} for d in draws)  # the first `pairs` draws
    same = [s for d in draws for s in d.same[:pairs]]
    both = _Draws([], [], drawn=sum(d.drawn for d in draws), unnatural=sum((d.unnatural for d in draws), Counter()),
                  mismatched=sum(d.mismatched for d in draws), several=set().union(*(d.several for d in draws)))
    failed = [d for d in draws if len(d.prompts) < pairs]
    if failed:
        candidates = f"task {task.name}: {failed[0].why()}"
    elif dropped := sum(d.dropped for d in draws):
        candidates = f"ok ({dropped} of {both.drawn} draws dropped: {both.why()})"
    else:
        candidates = "ok"
    return TaskCheck(name=task.name, distinct_train=len(train), distinct_test=len(test), overlap=len(test & train),
                     same_last_token=sum(same) / len(same), direct_path=task.direct_path, candidates=candidates)
