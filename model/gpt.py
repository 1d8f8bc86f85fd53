"""A GPT-2-style decoder for weight-sparse training (METHOD.md section 2), read top to bottom.

Leaf modules first, the root model last. Module names follow the paper's released layout
(`transformer.h.{i}.attn.c_attn`, ...; FORMAT-paper-checkpoint.md) so export is a rename-free copy;
hook points use the interpretability vocabulary. Sparsity of the weights is applied from outside
(model/sparsity.py); activation sparsity (AbsTopK) and hooks live here because they are part of the
forward pass.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.dispatch import Kernels, select_kernels
from kernels.sparse_compute import sparse_compute_linear
from kernels.sparse_inference import compress
from model.config import ModelConfig, abstopk_k, d_mlp, location_width, num_heads
from model.hooks import HookPoint


class SparseLinear(nn.Linear):
    """nn.Linear whose forward is the dispatched masked linear x @ (W*M)^T + b.

    `mask` is set by the projection (None while dense). `compress_()` switches the module to the
    forward-only CSR path (kernels/sparse_inference.py), `decompress_()` switches back; the choice is a
    bound function set once, never a branch in `forward`. No pipeline stage compresses a model: the path
    is checked against the masked forward (tests/kernels) and benchmarked (benchmarks/kernels.py).
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, kernels: Kernels) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.kernels = kernels
        self.register_buffer("mask", None, persistent=False)
        self.active = None  # sparse compute's active set (kernels/sparse_compute.py), set by the optimizer
        self._csr: torch.Tensor | None = None
        self._impl = self._masked_forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._impl(x)

    def _masked_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active is not None and not self.active.regrow:  # sparsity.compute=sparse, between regrow steps
            return sparse_compute_linear(x, self.weight, self.active, self.bias)
        return self.kernels.linear(x, self.weight, self.mask, self.bias)

    def _compressed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.sparse_linear(x, self._csr, self.bias, self._contiguous_out)

    def compress_(self, contiguous_out: bool = True) -> None:
        self._csr = compress(self.weight, self.mask)
        self._contiguous_out = contiguous_out
        self._impl = self._compressed_forward

    def decompress_(self) -> None:
        self._csr, self._impl = None, self._masked_forward


class _AbsTopK(torch.autograd.Function):
    """y = x * mask(top-k of |x| per row), with the gradient g * mask, by index instead of a mask: an
    unsorted top-k and a gather/scatter of the k kept entries each way. On the CPU this is 1.3-1.4x the
    masked product's forward + backward (AbsTopK runs at every node location, so it is half of the
    `cpu` preset's step); `AbsTopK.reference` is its plain-torch twin (tests/model/test_gpt.py)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int) -> torch.Tensor:
        index = x.detach().abs().topk(k, dim=-1, sorted=False).indices
        ctx.save_for_backward(index)
        return torch.zeros_like(x).scatter_(-1, index, x.gather(-1, index))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        return torch.zeros_like(grad).scatter_(-1, index, grad.gather(-1, index)), None


class AbsTopK(nn.Module):
    """Keep the k largest-magnitude values per token (last dim), zero the rest (METHOD.md 3).

    The gradient flows only through kept entries.
    """

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _AbsTopK.apply(x, self.k)

    @staticmethod
    def reference(x: torch.Tensor, k: int) -> torch.Tensor:
        """The plain-torch twin: x times a mask without grad."""
        index = x.detach().abs().topk(k, dim=-1).indices
        return x * torch.zeros_like(x, dtype=torch.bool).scatter_(-1, index, True)


def activation_sparsity(cfg: ModelConfig, location: str) -> nn.Module:
    if cfg.afrac >= 1.0 or location not in cfg.afrac_locations:
        return nn.Identity()
    return AbsTopK(abstopk_k(cfg.afrac, location_width(cfg, location)))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels) -> None:
        super().__init__()
        self.n_head, self.d_head = num_heads(cfg), cfg.d_head
        inner = self.n_head * self.d_head
        # rows of c_attn: q, k, v; each head-major
        self.c_attn = SparseLinear(cfg.d_model, 3 * inner, bias=cfg.bias, kernels=kernels)
        self.c_proj = SparseLinear(inner, cfg.d_model, bias=cfg.bias, kernels=kernels)
        self.sink_logit = nn.Parameter(torch.zeros(self.n_head)) if cfg.attention_sink else None
        self.act_in = activation_sparsity(cfg, "attn_in")
        self.act_q = activation_sparsity(cfg, "q")
        self.act_k = activation_sparsity(cfg, "k")
        self.act_v = activation_sparsity(cfg, "v")
        self.act_out = activation_sparsity(cfg, "attn_out")
        self.hook_in, self.hook_q, self.hook_k = HookPoint(), HookPoint(), HookPoint()
        self.hook_v, self.hook_out = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        x = self.hook_in(self.act_in(x))  # residual read (after ln_1)
        q, k, v = self.c_attn(x).split(self.n_head * self.d_head, dim=-1)
        q = self.hook_q(self.act_q(q))
        k = self.hook_k(self.act_k(k))
        v = self.hook_v(self.act_v(v))
        q, k, v = (t.view(B, T, self.n_head, self.d_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = self._attend(q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.d_head)  # (B, T, nh*hs)
        return self.hook_out(self.act_out(self.c_proj(y)))  # residual write

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.sink_logit is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        B, H, T, D = q.shape
        zeros = q.new_zeros(B, H, 1, D)
        k, v = torch.cat([zeros, k], dim=2), torch.cat([zeros, v], dim=2)  # (B, nh, 1+T, hs)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        bias = q.new_zeros(T, T).masked_fill(~causal, float("-inf"))  # (T, T)
        sink = self.sink_logit.view(H, 1, 1).expand(H, T, 1)  # the sink slot's logit, per head
        mask = torch.cat([sink, bias.expand(H, T, T)], dim=-1)  # (nh, T, 1+T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels) -> None:
        super().__init__()
        hidden = d_mlp(cfg)
        self.c_fc = SparseLinear(cfg.d_model, hidden, bias=cfg.bias, kernels=kernels)
        self.c_proj = SparseLinear(hidden, cfg.d_model, bias=cfg.bias, kernels=kernels)
        self.act_in = activation_sparsity(cfg, "mlp_in")
        self.act_neuron = activation_sparsity(cfg, "mlp_neuron")
        self.act_out = activation_sparsity(cfg, "mlp_out")
        self.hook_in, self.hook_post, self.hook_out = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hook_in(self.act_in(x))  # residual read (after ln_2)
        h = self.hook_post(self.act_neuron(F.gelu(self.c_fc(x))))  # neurons
        return self.hook_out(self.act_out(self.c_proj(h)))  # residual write


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels) -> None:
        super().__init__()
        self.ln_1 = nn.RMSNorm(cfg.d_model)  # RMSNorm keeps zero privileged (METHOD.md 2)
        self.attn = Attention(cfg, kernels)
        self.ln_2 = nn.RMSNorm(cfg.d_model)
        self.mlp = MLP(cfg, kernels)
        self.hook_resid_pre, self.hook_resid_mid, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_part(self.attn_part(x))

    def attn_part(self, x: torch.Tensor) -> torch.Tensor:
        """The residual before the attention sublayer -> the residual before the MLP sublayer."""
        x = self.hook_resid_pre(x)
        return self.hook_resid_mid(x + self.attn(self.ln_1(x)))

    def mlp_part(self, x: torch.Tensor) -> torch.Tensor:
        """The residual before the MLP sublayer -> the block's output."""
        return self.hook_resid_post(x + self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    """The root model. `device` picks the kernel set with `cfg.kernels` (kernels/dispatch.py); build the
    model for the device it will run on."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.kernels = kernels = select_kernels(device, cfg.kernels)
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab_size, cfg.d_model),
                "h": nn.ModuleList(Block(cfg, kernels) for _ in range(cfg.num_layers)),
                "ln_f": nn.RMSNorm(cfg.d_model),
            }
        )
        if cfg.pos_embedding == "learned":
            self.transformer["wpe"] = nn.Embedding(cfg.context_length, cfg.d_model)
        self.lm_head = SparseLinear(cfg.d_model, vocab_size, bias=False, kernels=kernels)  # untied (METHOD.md 2)
        self.hook_embed, self.hook_resid_final = HookPoint(), HookPoint()
        table = torch.zeros(vocab_size, vocab_size)  # row of the current token, added to the logits
        if cfg.bigram_table == "learnable":
            self.bigram_table = nn.Parameter(table)
        elif cfg.bigram_table == "fixed":
            self.register_buffer("bigram_table", table)  # filled from corpus counts by the pipeline
        else:
            self.bigram_table = None
        self.reset_parameters()
        self.to(device)

    def sparse_linears(self) -> list[SparseLinear]:
        return [m for m in self.modules() if isinstance(m, SparseLinear)]

    def compress_(self) -> None:
        """Forward-only CSR weights in every linear (faster than the masked product at density <= 1/64).

        Only the q/k/v projection must hand attention a unit last stride; the other linears return
        feature-major views, which saves a transpose copy per linear on the CPU."""
        for name, module in self.named_modules():
            if isinstance(module, SparseLinear):
                module.compress_(contiguous_out=name.endswith("attn.c_attn"))

    def decompress_(self) -> None:
        for module in self.sparse_linears():
            module.decompress_()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, std) weights, zero biases, residual writes scaled by 1/sqrt(2 x layers)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.num_layers))
            elif p.dim() == 2 and name != "bigram_table":
                nn.init.normal_(p, std=std)
            elif name.endswith(".bias") or name.endswith("sink_logit") or name == "bigram_table":
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab)."""
        x = self.embed(idx)
        for block in self.transformer["h"]:
            x = block(x)
        return self.unembed(x, idx)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> the first residual stream (B, T, d)."""
        T = idx.shape[1]
        if T > self.cfg.context_length:
            raise ValueError(f"sequence of {T} tokens exceeds model.context_length={self.cfg.context_length}")
        x = self.transformer["wte"](idx)  # (B, T, d)
        if "wpe" in self.transformer:
            x = x + self.transformer["wpe"](torch.arange(T, device=idx.device))
        return self.hook_embed(x)  # the embedding's residual write

    def unembed(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The final residual stream (B, T, d) and the token ids -> logits (B, T, vocab)."""
        x = self.hook_resid_final(self.transformer["ln_f"](x))  # the unembedding's read
        logits = self.lm_head(x)  # (B, T, vocab)
        if self.bigram_table is not None:
            # an embedding lookup: its CPU backward is deterministic, table[idx]'s index_put is not
            logits = logits + F.embedding(idx, self.bigram_table)
        return logits
