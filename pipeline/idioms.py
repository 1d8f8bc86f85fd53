"""The `idioms` corpus: procedurally generated, simple and repetitive Python (METHOD.md 2 and 8).

The paper trained on 10B tokens of "especially simple and repetitive idioms" besides realistic code; it
did not release them. This generator writes small, varied, syntactically valid programs in the style
of beginners' scripts: assignments and arithmetic, small functions and calls, for and while loops,
if/elif/else, ternaries, nested lists, dicts, sets, strings in both quote styles, f-strings, prints,
`with open(...)`, lambdas and defs, classes with `__init__`, swaps, enumerate and range, returns and
comments. Names and values come from vocabularies; nesting, lengths and formatting vary.

It is deterministic in its seed, and it shares no template with the task suite (pipeline/tasks.py):
the blocks below are written independently of the tasks' prompts, and a test checks that held-out task
prompts do not occur verbatim in a large sample (reporting the longest shared token n-gram).
"""

import keyword
import random
from collections.abc import Callable, Iterator

NOUNS = ("apple", "box", "city", "day", "egg", "file", "game", "hour", "item", "job", "key", "line", "map",
         "note", "order", "page", "queue", "row", "seed", "task", "unit", "value", "word", "year", "zone",
         "price", "score", "count", "total", "name", "color", "size", "level", "point", "step", "speed",
         "width", "height", "age", "cost", "label", "index", "number", "result", "message", "record")
ADJECTIVES = ("big", "small", "new", "old", "first", "last", "next", "best", "max", "min", "top", "low",
              "high", "raw", "clean", "full", "empty", "good", "bad", "main", "extra")
VERBS = ("get", "make", "add", "find", "check", "count", "build", "load", "save", "show", "update", "compute",
         "parse", "scale", "merge", "split", "clean", "sort", "pick", "double", "square", "greet")
CLASSES = ("Point", "Box", "Player", "Item", "Account", "Robot", "Animal", "Shape", "Car", "Book", "Student",
           "Order", "Timer", "Counter", "Node", "Cell", "Ticket", "Plant")
WORDS = ("hello", "world", "spam", "eggs", "red", "green", "blue", "yes", "no", "done", "ready", "ok", "cat",
         "dog", "tea", "sun", "moon", "alpha", "beta", "north", "south", "left", "right", "small", "large")
FILES = ("data.txt", "notes.txt", "log.txt", "input.csv", "out.txt", "scores.txt", "names.txt", "config.ini")


class Writer:
    """Lines at an indentation level; `indent_unit` varies between programs (4 spaces mostly)."""

    def __init__(self, unit: str) -> None:
        self.unit, self.level, self.lines = unit, 0, []

    def line(self, text: str = "") -> None:
        self.lines.append(self.unit * self.level + text if text else "")

    def indent(self) -> "Writer":
        self.level += 1
        return self

    def dedent(self) -> None:
        self.level -= 1


class Program:
    """One program's random state: the rng, the names in scope, the writer."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.out = Writer("  " if rng.random() < 0.1 else "    ")
        self.numbers: list[str] = []  # int variables in scope
        self.lists: list[str] = []
        self.strings: list[str] = []
        self.functions: list[tuple[str, int]] = []  # (name, arity) of defined one-number functions
        self.used: set[str] = set()

    def name(self, kind: str = "num") -> str:
        rng = self.rng
        for _ in range(20):
            noun = rng.choice(NOUNS)
            if kind == "list":
                noun = noun[:-1] + "ies" if noun.endswith("y") else noun + ("_list" if noun.endswith("s") else "s")
            form = rng.random()
            short = noun[0] + noun[-1]
            candidate = f"{rng.choice(ADJECTIVES)}_{noun}" if form < 0.35 else noun if form < 0.8 else short
            if candidate not in self.used and not keyword.iskeyword(candidate):
                self.used.add(candidate)
                return candidate
        candidate = f"{noun}_{len(self.used)}"
        self.used.add(candidate)
        return candidate

    def number(self) -> str:
        rng = self.rng
        if self.numbers and rng.random() < 0.5:
            return rng.choice(self.numbers)
        return str(rng.choice((0, 1, 2, 3, 4, 5, 10, 12, 20, 42, 100, rng.randint(0, 99))))

    def string(self) -> str:
        word = self.rng.choice(WORDS)
        return f'"{word}"' if self.rng.random() < 0.5 else f"'{word}'"

    def expr(self, depth: int = 0) -> str:
        rng = self.rng
        if depth > 1 or rng.random() < 0.4:
            return self.number()
        op = rng.choice(("+", "-", "*", "//", "%", "+", "*"))
        left, right = self.expr(depth + 1), self.expr(depth + 1)
        if op in ("//", "%") and right in ("0",):
            right = str(rng.randint(1, 9))
        text = f"{left} {op} {right}"
        return f"({text})" if depth and rng.random() < 0.5 else text

    def condition(self) -> str:
        rng = self.rng
        left = rng.choice(self.numbers) if self.numbers else self.number()
        op = rng.choice(("<", ">", "<=", ">=", "==", "!="))
        return f"{left} {op} {self.number()}"


# --- blocks: each writes a few lines at the current indentation ------------------------------------

def assign(p: Program) -> None:
    name = p.name()
    p.out.line(f"{name} = {p.expr()}")
    p.numbers.append(name)
    if p.rng.random() < 0.3:
        p.out.line(f"{name} {p.rng.choice(('+=', '-=', '*='))} {p.number()}")


def strings(p: Program) -> None:
    name = p.name()
    rng = p.rng
    form = rng.random()
    if form < 0.4:
        p.out.line(f"{name} = {p.string()}")
    elif form < 0.7:
        p.out.line(f"{name} = {p.string()} + {p.string()}")
    else:
        p.out.line(f"{name} = {p.string()}.{rng.choice(('upper', 'lower', 'strip', 'title'))}()")
    p.strings.append(name)


def fstring(p: Program) -> None:
    rng = p.rng
    if not p.numbers:
        assign(p)
    value = rng.choice(p.numbers)
    word = rng.choice(WORDS)
    quote = '"' if rng.random() < 0.6 else "'"
    fmt = rng.choice(("", ":>4", ":.2f", ":03d", "")) if rng.random() < 0.3 else ""
    text = rng.choice((f"{word} {{{value}{fmt}}}", f"{{{value}{fmt}}} {word}", f"{value} = {{{value}}}"))
    if rng.random() < 0.5:
        p.out.line(f"print(f{quote}{text}{quote})")
    else:
        name = p.name()
        p.out.line(f"{name} = f{quote}{text}{quote}")
        p.strings.append(name)


def printing(p: Program) -> None:
    rng = p.rng
    pool = p.numbers + p.strings + p.lists
    if not pool or rng.random() < 0.2:
        p.out.line(f"print({p.string()})")
    elif rng.random() < 0.5:
        p.out.line(f"print({rng.choice(pool)})")
    else:
        p.out.line(f"print({p.string()}, {rng.choice(pool)})")


def list_literal(p: Program) -> None:
    rng = p.rng
    name = p.name("list")
    size = rng.randint(0, 5)
    if rng.random() < 0.3:  # nested
        rows = [f"[{', '.join(str(rng.randint(0, 9)) for _ in range(rng.randint(1, 3)))}]" for _ in range(size or 1)]
        p.out.line(f"{name} = [{', '.join(rows)}]")
    elif rng.random() < 0.3:
        p.out.line(f"{name} = [{', '.join(p.string() for _ in range(size))}]")
    else:
        p.out.line(f"{name} = [{', '.join(str(rng.randint(0, 50)) for _ in range(size))}]")
    p.lists.append(name)
    if rng.random() < 0.3:
        p.out.line(f"{name}.append({p.number()})")


def dict_literal(p: Program) -> None:
    rng = p.rng
    name = p.name()
    keys = rng.sample(WORDS, rng.randint(1, 4))
    quote = '"' if rng.random() < 0.5 else "'"
    items = ", ".join(f"{quote}{k}{quote}: {rng.randint(0, 20)}" for k in keys)
    p.out.line(f"{name} = {{{items}}}")
    if rng.random() < 0.5:
        p.out.line(f"{name}[{quote}{rng.choice(keys)}{quote}] += {rng.randint(1, 5)}")
    if rng.random() < 0.4:
        key, value = p.name(), p.name()
        p.out.line(f"for {key}, {value} in {name}.items():")
        p.out.indent().line(f"print({key}, {value})")
        p.out.dedent()


def set_literal(p: Program) -> None:
    rng = p.rng
    name = p.name()
    p.out.line(f"{name} = {{{', '.join(str(v) for v in rng.sample(range(20), rng.randint(1, 4)))}}}")
    if rng.random() < 0.5:
        p.out.line(f"{name}.add({rng.randint(0, 30)})")
    if rng.random() < 0.4:
        p.out.line(f"print({rng.randint(0, 20)} in {name})")


def for_loop(p: Program, depth: int) -> None:
    rng = p.rng
    var = rng.choice(("i", "j", "k", "n", "x")) if rng.random() < 0.6 else p.name()
    form = rng.random()
    if form < 0.4:
        p.out.line(f"for {var} in range({rng.choice(('', '1, '))}{rng.randint(2, 10)}):")
    elif form < 0.7 and p.lists:
        p.out.line(f"for {var} in {rng.choice(p.lists)}:")
    elif p.lists:
        index = rng.choice(("i", "idx", "pos"))
        p.out.line(f"for {index}, {var} in enumerate({rng.choice(p.lists)}):")
    else:
        p.out.line(f"for {var} in [{', '.join(str(rng.randint(0, 9)) for _ in range(3))}]:")
    p.out.indent()
    p.numbers.append(var)
    body(p, depth + 1, rng.randint(1, 2))
    p.numbers.remove(var)
    p.out.dedent()


def while_loop(p: Program, depth: int) -> None:
    rng = p.rng
    counter = p.name()
    p.out.line(f"{counter} = {rng.randint(0, 3)}")
    p.out.line(f"while {counter} < {rng.randint(4, 12)}:")
    p.out.indent()
    p.numbers.append(counter)
    if rng.random() < 0.5:
        body(p, depth + 1, 1)
    p.out.line(f"{counter} += {rng.choice((1, 1, 2))}")
    p.out.dedent()


def if_block(p: Program, depth: int) -> None:
    rng = p.rng
    p.out.line(f"if {p.condition()}:")
    p.out.indent()
    body(p, depth + 1, 1)
    p.out.dedent()
    for _ in range(rng.choice((0, 0, 1, 2))):
        p.out.line(f"elif {p.condition()}:")
        p.out.indent()
        body(p, depth + 1, 1)
        p.out.dedent()
    if rng.random() < 0.6:
        p.out.line("else:")
        p.out.indent()
        body(p, depth + 1, 1)
        p.out.dedent()


def ternary(p: Program) -> None:
    name = p.name()
    left, right = (p.number(), p.number()) if p.rng.random() < 0.6 else (p.string(), p.string())
    p.out.line(f"{name} = {left} if {p.condition()} else {right}")


def swap(p: Program) -> None:
    while len(p.numbers) < 2:
        assign(p)
    a, b = p.rng.sample(p.numbers, 2)
    if p.rng.random() < 0.7:
        p.out.line(f"{a}, {b} = {b}, {a}")
    else:
        tmp = p.name()
        p.out.line(f"{tmp} = {a}")
        p.out.line(f"{a} = {b}")
        p.out.line(f"{b} = {tmp}")


def function(p: Program) -> None:
    rng = p.rng
    name = f"{rng.choice(VERBS)}_{rng.choice(NOUNS)}"
    if any(name == f for f, _ in p.functions):
        return
    params = rng.sample(("a", "b", "x", "y", "n", "value", "count"), rng.randint(1, 3))
    default = f", {rng.choice(('step', 'scale', 'offset'))}={rng.randint(1, 5)}" if rng.random() < 0.25 else ""
    p.out.line(f"def {name}({', '.join(params)}{default}):")
    p.out.indent()
    if rng.random() < 0.3:
        p.out.line(f'"""{rng.choice(VERBS).capitalize()} the {rng.choice(NOUNS)}."""')
    if rng.random() < 0.4:
        p.out.line(f"if {params[0]} {rng.choice(('<', '>', '=='))} {rng.randint(0, 5)}:")
        p.out.indent().line(f"return {rng.randint(0, 5)}")
        p.out.dedent()
    op = rng.choice(("+", "*", "-"))
    joined = f" {op} ".join(params) if len(params) > 1 else f"{params[0]} {op} {rng.randint(1, 9)}"
    p.out.line(f"return {joined}")
    p.out.dedent()
    p.out.line()
    p.functions.append((name, len(params)))


def call(p: Program) -> None:
    if not p.functions:
        function(p)
    if not p.functions:
        return
    name, arity = p.rng.choice(p.functions)
    result = p.name()
    p.out.line(f"{result} = {name}({', '.join(p.number() for _ in range(arity))})")
    p.numbers.append(result)


def lambda_block(p: Program) -> None:
    rng = p.rng
    name = rng.choice(("double", "square", "inc", "half", "neg", "twice", "plus_one"))
    if any(name == f for f, _ in p.functions):
        return
    var = rng.choice(("x", "v", "n"))
    p.out.line(f"{name} = lambda {var}: {var} {rng.choice(('*', '+', '-', '//'))} {rng.randint(1, 4)}")
    p.functions.append((name, 1))
    if p.lists and rng.random() < 0.5:
        p.out.line(f"{p.name('list')} = list(map({name}, {rng.choice(p.lists)}))")


def class_block(p: Program) -> None:
    rng = p.rng
    cls = rng.choice(CLASSES)
    fields = rng.sample(("x", "y", "name", "size", "speed", "color", "owner", "level", "price"), rng.randint(1, 3))
    p.out.line(f"class {cls}:")
    p.out.indent()
    p.out.line(f"def __init__(self, {', '.join(fields)}):")
    p.out.indent()
    for f in fields:
        p.out.line(f"self.{f} = {f}")
    p.out.dedent()
    if rng.random() < 0.6:
        p.out.line()
        method = rng.choice(("describe", "show", "total", "area", "grow", "reset"))
        p.out.line(f"def {method}(self):")
        p.out.indent().line(rng.choice((f"return self.{fields[0]}", f"print(self.{fields[-1]})",
                                        f"self.{fields[0]} = {rng.randint(0, 3)}")))
        p.out.dedent()
    p.out.dedent()
    p.out.line()
    obj = cls.lower()
    p.out.line(f"{obj} = {cls}({', '.join(str(rng.randint(0, 9)) for _ in fields)})")
    p.out.line(f"print({obj}.{rng.choice(fields)})")


def with_open(p: Program) -> None:
    rng = p.rng
    handle = rng.choice(("f", "fh", "handle", "out"))
    mode = rng.choice(("r", "w", "a"))
    quote = '"' if rng.random() < 0.5 else "'"
    p.out.line(f"with open({quote}{rng.choice(FILES)}{quote}, {quote}{mode}{quote}) as {handle}:")
    p.out.indent()
    if mode == "r":
        p.out.line(rng.choice((f"text = {handle}.read()", f"lines = {handle}.readlines()",
                               f"for line in {handle}:")))
        if p.out.lines[-1].endswith(":"):
            p.out.indent().line("print(line.strip())")
            p.out.dedent()
    else:
        p.out.line(f"{handle}.write({p.string()})")
    p.out.dedent()


def comment(p: Program) -> None:
    rng = p.rng
    p.out.line(f"# {rng.choice(VERBS)} the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}")


SIMPLE: tuple[Callable[[Program], None], ...] = (assign, assign, strings, fstring, printing, list_literal,
                                                 dict_literal, set_literal, ternary, swap, call, comment)
NESTED: tuple[Callable[[Program, int], None], ...] = (for_loop, while_loop, if_block)
TOP: tuple[Callable[[Program], None], ...] = (function, lambda_block, class_block, with_open)


def body(p: Program, depth: int, count: int) -> None:
    for _ in range(count):
        if depth < 3 and p.rng.random() < 0.25:
            p.rng.choice(NESTED)(p, depth)
        else:
            block = p.rng.choice(SIMPLE)
            block(p)
            if block is comment:  # a comment alone is not a block body
                assign(p)


def program(rng: random.Random) -> str:
    """One small program: a mix of blocks, top-level definitions first or interleaved."""
    p = Program(rng)
    for _ in range(rng.randint(3, 10)):
        roll = rng.random()
        if roll < 0.2:
            rng.choice(TOP)(p)
        elif roll < 0.5:
            rng.choice(NESTED)(p, 0)
        else:
            rng.choice(SIMPLE)(p)
        if rng.random() < 0.15:
            p.out.line()
    text = "\n".join(p.out.lines).strip("\n")
    return text.replace("\n\n\n", "\n\n") + "\n"


def generate(seed: int, total_bytes: int) -> Iterator[str]:
    """Programs until `total_bytes` UTF-8 bytes are written (deterministic in `seed`)."""
    rng = random.Random(f"idioms/{seed}")
    written = 0
    while written < total_bytes:
        text = program(rng)
        written += len(text.encode("utf-8"))
        yield text
