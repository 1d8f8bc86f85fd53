"""Bridges (METHOD.md 7): a weight-sparse model trained beside a frozen dense one, coupled at every bridge
site by an encoder (linear then AbsTopK, dense -> sparse) and a decoder (linear, sparse -> dense).

Sites are residual streams, in order: before each layer's attention sublayer (`h{l}.pre`), before its MLP
sublayer (`h{l}.mid`), and the final residual before the unembedding (`final`): 2 x layers + 1 of them.
Both models must have the same number of layers. `residuals` records a model's stream at every site;
`run_from` continues a model from a residual at one site to its logits, so a hybrid (one model's prefix,
the other's suffix, joined through the bridge) is `run_from(b, site, bridge.encode(site, x), idx)`.

The loss (`bridge_terms`): the sparse model's next-token cross-entropy, and per site the normalized MSE
of encode(dense) against sparse and of decode(sparse) against dense, and the KL divergence from the
dense model's next-token distribution to each hybrid's (dense prefix then sparse suffix, sparse prefix
then dense suffix) at one site drawn per call from torch's generator (a checkpoint restores its state).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.gpt import GPT, AbsTopK


def site_names(num_layers: int) -> list[str]:
    return [f"h{layer}.{part}" for layer in range(num_layers) for part in ("pre", "mid")] + ["final"]


def residuals(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream at every site (site_names order) of `model` on token ids (B, T)."""
    out = []
    x = model.embed(idx)
    for block in model.transformer["h"]:
        out.append(x)
        x = block.attn_part(x)
        out.append(x)
        x = block.mlp_part(x)
    out.append(x)
    return out


def run_from(model: GPT, site: int, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Logits of `model` continued from residual `x` at site number `site` (token ids `idx` for the bigram
    table); run_from(m, 0, m.embed(idx), idx) equals m(idx)."""
    blocks = model.transformer["h"]
    layer, part = divmod(site, 2)
    if layer < len(blocks):
        if part == 0:
            x = blocks[layer].attn_part(x)
        x = blocks[layer].mlp_part(x)
        for block in blocks[layer + 1:]:
            x = block(x)
    return model.unembed(x, idx)


class Bridge(nn.Module):
    """Per site an encoder (d_dense -> d_sparse, then AbsTopK keeping `k`) and a decoder (d_sparse ->
    d_dense), all dense linear maps with biases."""

    def __init__(self, d_dense: int, d_sparse: int, sites: int, k: int) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(nn.Linear(d_dense, d_sparse) for _ in range(sites))
        self.decoders = nn.ModuleList(nn.Linear(d_sparse, d_dense) for _ in range(sites))
        self.topk = AbsTopK(k) if k < d_sparse else nn.Identity()

    def encode(self, site: int, x: torch.Tensor) -> torch.Tensor:
        return self.topk(self.encoders[site](x))

    def decode(self, site: int, y: torch.Tensor) -> torch.Tensor:
        return self.decoders[site](y)


class BridgedPair(nn.Module):
    """What trains: the sparse model and the bridge. The dense model is frozen and kept outside the module
    tree (not in its parameters, state or checkpoints): `forward` is the sparse model's own."""

    def __init__(self, sparse: GPT, bridge: Bridge, dense: GPT) -> None:
        super().__init__()
        if sparse.cfg.num_layers != dense.cfg.num_layers:
            raise ValueError(f"a bridge needs equal layer counts: sparse {sparse.cfg.num_layers}, "
                             f"dense {dense.cfg.num_layers}")
        self.sparse, self.bridge = sparse, bridge
        self.kernels = sparse.kernels
        dense.eval().requires_grad_(False)
        self._dense = [dense]  # a list: not a registered submodule

    @property
    def dense(self) -> GPT:
        return self._dense[0]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.sparse(idx)


@dataclass(frozen=True)
class TermWeights:
    ce: float = 1.0
    nmse_encode: float = 1.0
    nmse_decode: float = 1.0
    kl_dense_prefix: float = 1.0
    kl_sparse_prefix: float = 1.0


def nmse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over every position, over the target's squared norm summed the same way (the
    fraction of the target's energy left unexplained). The denominator is a constant to the gradient: the
    sparse model cannot lower the term by inflating its own residual. (A per-position ratio, averaged, blew
    up on a real run: a sparse embedding row with no weight left gives a zero residual at `h0.pre`, and
    those few positions, at ratios up to 3e4, decided the whole term and its gradient.)"""
    error = (prediction.float() - target.float()).pow(2).sum()
    return error / target.detach().float().pow(2).sum().clamp_min(1e-8)


def kl_from(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) of the next-token distributions, averaged over positions."""
    ref = F.log_softmax(reference_logits.float(), dim=-1)
    out = F.log_softmax(logits.float(), dim=-1)
    return (ref.exp() * (ref - out)).sum(-1).mean()


def bridge_terms(pair: BridgedPair, batch: torch.Tensor, *, sites: list[int] | None = None
                 ) -> dict[str, torch.Tensor]:
    """Every term of the bridge loss on a (B, T + 1) window batch. The hybrid KLs run at `sites` (their
    mean), by default at one site drawn from torch's generator."""
    idx, targets = batch[:, :-1], batch[:, 1:]
    with torch.no_grad():
        dense_res = residuals(pair.dense, idx)
        dense_logits = pair.dense.unembed(dense_res[-1], idx)
    sparse_res = residuals(pair.sparse, idx)
    sparse_logits = pair.sparse.unembed(sparse_res[-1], idx)
    n = len(sparse_res)
    terms = {
        "ce": F.cross_entropy(sparse_logits.reshape(-1, sparse_logits.shape[-1]).float(), targets.reshape(-1)),
        "nmse_encode": sum(nmse(pair.bridge.encode(i, dense_res[i]), sparse_res[i]) for i in range(n)) / n,
        "nmse_decode": sum(nmse(pair.bridge.decode(i, sparse_res[i]), dense_res[i]) for i in range(n)) / n,
    }
    if sites is None:
        sites = [int(torch.randint(n, (1,)))]
    terms["kl_dense_prefix"] = sum(
        kl_from(dense_logits, run_from(pair.sparse, i, pair.bridge.encode(i, dense_res[i]), idx)) for i in sites
    ) / len(sites)
    terms["kl_sparse_prefix"] = sum(
        kl_from(dense_logits, run_from(pair.dense, i, pair.bridge.decode(i, sparse_res[i]), idx)) for i in sites
    ) / len(sites)
    return terms


def bridge_loss(pair: BridgedPair, batch: torch.Tensor, weights: TermWeights) -> torch.Tensor:
    terms = bridge_terms(pair, batch)
    return sum(getattr(weights, name) * value for name, value in terms.items())
