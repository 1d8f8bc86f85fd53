"""The L0-following step (`sparsity.compute=sparse`): a weight matrix trains through its nonzeros and a
candidate set only, instead of dense products on masked weights.

What we follow: Top-KAST (Jayakumar et al. 2020, "Top-KAST: Top-K Always Sparse Training") for the shape
of the step (the forward pass reads the top-k set only; the backward pass and the optimizer see a larger
set, so that entries outside the top-k can grow into it), and RigL (Evci et al. 2020, "Rigging the
Lottery") for how that larger set is chosen: every `sparsity.regrow_every` steps one dense-gradient step,
and the candidates are the entries outside the top-k with the largest gradient magnitude.

Per matrix in this mode an `ActiveSet` holds the active entries (flat indices, ascending): the kept
top-k (exactly the module's mask) plus `candidates x k` candidates. Then, each step:
- forward: y = x W^T with W as CSR over the kept entries (values gathered from the dense parameter);
- backward: the input gradient through the transposed CSR, and the weight gradient at the active entries
  only (sampled dense-dense products, SDDMM) into a leaf vector of the active values;
- optimizer (kernels/optimizer.py, SparseAdam): Adam moments live on the active entries only; the top-k
  projection with the per-neuron floor runs over the active values (`project_active`), and the result is
  scattered into the dense parameter and mask (O(active) writes: no pass over the dense matrix).
A regrow step runs the exact masked product (dense weight gradient), picks the new candidates from it,
carries the moments of entries that stay active and starts new ones at zero (RigL).

The dense parameter and its mask stay what the exact recipe keeps (W zero outside the mask, exactly k
entries, the floor held), so checkpoints, export and pruning see no difference.
"""

import functools
import math
import warnings
from dataclasses import dataclass, field

import torch

# Measured crossover (benchmarks/l0_step.py): the sparse step is used for a matrix only at or below this
# density on the given device type; denser matrices keep the exact (dense-product) path. A device type
# without a measured crossover (cuda: no GPU was at hand when this was written) always takes the exact path.
CROSSOVER = {"cpu": 1 / 32}


def pays(density: float, device: torch.device) -> bool:
    """The dispatch rule: whether the sparse step is worth it for a matrix at `density` on `device`."""
    return density <= CROSSOVER.get(device.type, 0.0) + 1e-12


@dataclass
class ActiveSet:
    """A matrix's active entries (kept top-k + candidates) and what the sparse step derives from them."""

    shape: tuple[int, int]
    index: torch.Tensor  # (E,) int64 flat indices, ascending
    kept: torch.Tensor  # (E,) bool: the current top-k within the active set (the module's mask there)
    regrow: bool = False  # the next step is a regrow step: the exact masked product, dense weight gradient
    _values: torch.Tensor | None = field(default=None, repr=False)
    _version: int = -1
    _plan: tuple | None = field(default=None, repr=False)

    # `index` is fixed for the life of an active set (a regrow makes a new one): its rows, columns and CSR
    # row pointers are computed once, not at every forward, backward and projection
    @functools.cached_property
    def rows(self) -> torch.Tensor:
        return torch.div(self.index, self.shape[1], rounding_mode="floor")

    @functools.cached_property
    def cols(self) -> torch.Tensor:
        return self.index % self.shape[1]

    def values(self, weight: torch.Tensor) -> torch.Tensor:
        """The leaf vector of the active values this step (gathered from the dense weight once per weight
        version, so micro-batches accumulate into one gradient); its `.grad` is the step's weight gradient."""
        if self._values is None or self._version != weight._version:
            self._values = weight.detach().reshape(-1)[self.index].requires_grad_()
            self._version = weight._version
        return self._values

    @property
    def grad(self) -> torch.Tensor | None:
        """This step's gradient at the active entries so far (None before a backward pass)."""
        return None if self._values is None else self._values.grad

    def take_grad(self) -> torch.Tensor | None:
        grad = self.grad
        self._values = None
        return grad

    def plan(self) -> tuple:
        """CSR structure of the kept entries (rows ascending) and of their transpose, with the positions of
        the kept entries in the active vector; rebuilt when the kept set changes."""
        if self._plan is None:
            out_f, in_f = self.shape
            pos = self.kept.nonzero().squeeze(1)
            rows, cols = self.rows[pos], self.cols[pos]
            crow = torch.zeros(out_f + 1, dtype=torch.int64, device=self.index.device)
            crow[1:] = torch.bincount(rows, minlength=out_f).cumsum(0)
            perm = torch.argsort(cols * out_f + rows)
            crow_t = torch.zeros(in_f + 1, dtype=torch.int64, device=self.index.device)
            crow_t[1:] = torch.bincount(cols, minlength=in_f).cumsum(0)
            self._plan = (pos, crow, cols, pos[perm], crow_t, rows[perm].contiguous())
        return self._plan

    @functools.cached_property
    def active_crow(self) -> torch.Tensor:
        """CSR row pointers of the whole active set (its indices are ascending, so rows are)."""
        crow = torch.zeros(self.shape[0] + 1, dtype=torch.int64, device=self.index.device)
        crow[1:] = torch.bincount(self.rows, minlength=self.shape[0]).cumsum(0)
        return crow

    def set_kept(self, kept: torch.Tensor) -> None:
        self.kept = kept
        self._plan = None


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def sddmm(active: "ActiveSet", grad_out_t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """g[e] = <grad_out_t[rows[e]], x_t[cols[e]]> for every active entry e (in index order): the weight
    gradient at the active entries only, by torch.sparse.sampled_addmm over the active set's CSR pattern
    (measured on the 2-core CPU, 4096 x 1024 at 1/32, 1024 tokens: 8.4 ms against 48 ms for the dense
    product and 340 ms for gathering the rows and reducing)."""
    pattern = _csr(active.active_crow, active.cols, torch.zeros_like(active.index, dtype=x_t.dtype),
                   active.shape)
    return torch.sparse.sampled_addmm(pattern, grad_out_t, x_t.t()).values()


def sddmm_reference(rows: torch.Tensor, cols: torch.Tensor, grad_out_t: torch.Tensor,
                    x_t: torch.Tensor) -> torch.Tensor:
    """Plain-torch twin of `sddmm`: gather the rows, multiply, reduce."""
    return (grad_out_t[rows] * x_t[cols]).sum(1)


class _SparseComputeLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, active, bias):
        pos, crow, col, pos_t, crow_t, col_t = active.plan()
        flat = x.reshape(-1, x.shape[-1])
        x_t = flat.t().contiguous()  # (in, tokens)
        weight = _csr(crow, col, values.detach()[pos], active.shape)
        y_t = weight @ x_t  # (out, tokens)
        if bias is not None:
            y_t += bias.detach()[:, None]
        ctx.save_for_backward(x_t, values)
        ctx.active, ctx.has_bias, ctx.in_shape = active, bias is not None, x.shape
        return y_t.t().contiguous().unflatten(0, x.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        x_t, values = ctx.saved_tensors
        active = ctx.active
        pos, crow, col, pos_t, crow_t, col_t = active.plan()
        g_t = grad_out.reshape(-1, grad_out.shape[-1]).t().contiguous()  # (out, tokens)
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight_t = _csr(crow_t, col_t, values.detach()[pos_t], (active.shape[1], active.shape[0]))
            grad_x = (weight_t @ g_t).t().reshape(ctx.in_shape)
        grad_values = sddmm(active, g_t, x_t) if ctx.needs_input_grad[1] else None
        grad_b = g_t.sum(1) if ctx.has_bias else None
        return grad_x, grad_values, None, grad_b


def sparse_compute_linear(x: torch.Tensor, weight: torch.Tensor, active: ActiveSet,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ (W * M)^T + b through the kept entries only; the weight gradient lands on
    `active.values(weight).grad` at the active entries (W itself gets none)."""
    return _SparseComputeLinear.apply(x, active.values(weight), active, bias)


def project_active(values: torch.Tensor, active: ActiveSet, k: int, floor: int, floor_dim: int | None) -> torch.Tensor:
    """The top-k mask over the active entries: each neuron's `floor` largest along `floor_dim` first (the
    kept set always holds them, so every neuron has that many active entries), then the k - |floor|
    largest of the rest; exactly k entries (ties: lower flat index first)."""
    magnitude = values.detach().abs()
    kept = torch.zeros_like(magnitude, dtype=torch.bool)
    if floor and floor_dim is not None:
        floor = min(floor, active.shape[floor_dim])
        neuron = active.rows if floor_dim == 1 else active.cols
        # one sort, by neuron, then magnitude descending: key = 2 x neuron + (1 - |v| / bound) in float64
        bound = float(magnitude.max()) * 1.0001 + 1e-30 if magnitude.numel() else 1.0
        key = neuron.double() * 2.0 + (1.0 - magnitude.double() / bound)
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(neuron, minlength=active.shape[1 - floor_dim])
        starts = counts.cumsum(0) - counts
        rank = torch.arange(order.numel(), device=order.device) - starts[neuron[order]]
        kept[order[rank < floor]] = True
    remaining = k - int(kept.sum())
    assert remaining >= 0, "the floor does not fit in k; config validation should have caught this"
    if remaining:
        scores = magnitude.masked_fill(kept, -1.0)
        kept[torch.topk(scores, remaining, sorted=False).indices] = True
    return kept


def grow(mask: torch.Tensor, dense_grad: torch.Tensor, candidates: int) -> torch.Tensor:
    """The new active set's flat indices (ascending): the kept entries of `mask` and the `candidates`
    entries outside it with the largest gradient magnitude (RigL's criterion)."""
    flat_mask = mask.reshape(-1)
    scores = dense_grad.detach().abs().reshape(-1).masked_fill(flat_mask, -1.0)
    candidates = min(candidates, int(scores.numel() - flat_mask.sum()))
    chosen = torch.topk(scores, candidates, sorted=False).indices if candidates > 0 else scores.new_empty(0).long()
    return torch.cat([flat_mask.nonzero().squeeze(1), chosen]).sort().values


def carry(old_index: torch.Tensor, old: torch.Tensor, new_index: torch.Tensor) -> torch.Tensor:
    """Values of `old` (over `old_index`) moved to `new_index`; entries new to the set start at zero."""
    where = torch.searchsorted(old_index, new_index).clamp_max_(max(old_index.numel() - 1, 0))
    out = torch.zeros(new_index.numel(), dtype=old.dtype, device=old.device)
    if old_index.numel():
        hit = old_index[where] == new_index
        out[hit] = old[where[hit]]
    return out


def candidate_count(k: int, ratio: float) -> int:
    return math.ceil(ratio * k)
