"""Hook points: named identity modules at every node location, and context managers to use them.

A `HookPoint`'s name is its module path (`transformer.h.0.attn.hook_q`), in the TransformerLens
vocabulary. Hook functions live on the hook point instance for the duration of a `with` block (no
global state); nested blocks compose in order and each removes exactly what it added.
"""

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

HookFn = Callable[[torch.Tensor], torch.Tensor | None]


class HookPoint(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._fns: list[HookFn] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self._fns:
            out = fn(x)
            if out is not None:
                x = out
        return x


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    return {name: m for name, m in model.named_modules() if isinstance(m, HookPoint)}


def resolve_hooks(model: nn.Module, names: list[str] | None) -> dict[str, HookPoint]:
    points = hook_points(model)
    if names is None:
        return points
    unknown = [n for n in names if n not in points]
    if unknown:
        raise KeyError(f"unknown hook point(s) {unknown}; the model has e.g. {sorted(points)[:4]}")
    return {n: points[n] for n in names}


@contextmanager
def attach(model: nn.Module, fns: Mapping[str, HookFn]) -> Iterator[None]:
    """Run `fns[name]` at each named hook point inside the block; removed on exit, even on error."""
    points = resolve_hooks(model, list(fns))
    added = []
    try:
        for name, fn in fns.items():
            points[name]._fns.append(fn)
            added.append((points[name], fn))
        yield
    finally:
        for point, fn in reversed(added):
            point._fns.remove(fn)


@contextmanager
def record(model: nn.Module, names: list[str] | None = None, *, detach: bool = True) -> Iterator[dict]:
    """Record the activations at `names` (all hook points if None) into the yielded dict."""
    cache: dict[str, torch.Tensor] = {}

    def saver(name: str) -> HookFn:
        def save(x: torch.Tensor) -> None:
            cache[name] = x.detach() if detach else x

        return save

    with attach(model, {name: saver(name) for name in resolve_hooks(model, names)}):
        yield cache


@contextmanager
def intervene(model: nn.Module, fns: Mapping[str, HookFn]) -> Iterator[None]:
    """Replace activations: each function maps the activation at its hook point to a new one."""
    with attach(model, fns):
        yield

