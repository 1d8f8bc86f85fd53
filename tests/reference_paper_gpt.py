"""The forward pass of the paper's released inference code, re-implemented in plain torch for export tests.

Written from openai/circuit_sparsity at commit 8a029a3711b654b9afffa1b6305b2df149c2ccad, file
circuit_sparsity/inference/gpt.py: `GPTConfig` and `GPTConfig.maybe_activation_sparsity` (AbsTopK, k =
int(afrac * x.shape[-1]), i.e. truncation, no lower bound), `CausalSelfAttention.forward`, `SDPAWithSink`,
`MLP.forward`, `Block.forward_attn_block` / `forward_mlp_block`, `GPT.forward` / `forward_tail` and
`load_model` (config key handling, default zero `final_logits_bias`). It follows that code, not ours, wherever
the two differ. Takes the two files of an export: `beeg_config.json` (as a dict) and `final_model.pt` (a state
dict); positional-concat models (`d_pos_emb`) are out of scope.
"""

import math

import torch
import torch.nn.functional as F

# GPTConfig's fields: GPTConfig(**beeg_config_json) fails on any other key.
CONFIG_FIELDS = frozenset(
    "block_size vocab_size n_layer n_head d_head d_model dropout bias ln_bias rms_norm residual_activation_type "
    "activation_type afrac afrac_loctypes debug_nans tied_unembed tokenizer_name grad_checkpointing d_mlp "
    "enable_bigram_table learnable_bigram_table d_pos_emb dropout_cat_pos_emb sinusoidal_cat_pos_emb "
    "enable_sparse_kernels flash sink".split()
)


def load_config(raw: dict) -> dict:
    """load_model's handling of beeg_config.json, then GPTConfig's defaults and __post_init__."""
    cfg = dict(raw)
    if "n_mlp" in cfg:
        cfg["d_mlp"] = cfg.pop("n_mlp")
    cfg.setdefault("sink", False)
    cfg["flash"] = True  # the loader overrides it; a sink is only correct with flash=True
    if "use_tied_aux_matrix" in cfg:
        assert not cfg.pop("use_tied_aux_matrix")
    unknown = set(cfg) - CONFIG_FIELDS
    if unknown:
        raise TypeError(f"GPTConfig got unexpected keys {sorted(unknown)}")
    defaults = {"bias": True, "ln_bias": True, "rms_norm": False, "residual_activation_type": "identity",
                "activation_type": "gelu", "afrac": None, "afrac_loctypes": "attn_in,attn_out,mlp_in,mlp_out",
                "tied_unembed": True, "d_mlp": None, "d_head": None, "enable_bigram_table": False, "d_pos_emb": None}
    cfg = {**defaults, **cfg}
    assert cfg["d_model"] % cfg["n_head"] == 0
    if cfg["d_mlp"] is None:
        cfg["d_mlp"] = 4 * cfg["d_model"]
    if cfg["d_head"] is None:
        cfg["d_head"] = cfg["d_model"] // cfg["n_head"]
    if cfg["d_pos_emb"] is not None:
        raise NotImplementedError("concatenated position embeddings are not covered by this reference")
    return cfg


def maybe_activation_sparsity(cfg: dict, x: torch.Tensor, loctype: str) -> torch.Tensor:
    """Keep the int(afrac * dim) largest-|x| entries along the last dim (per token), zero the rest."""
    if cfg["afrac"] is not None and loctype in cfg["afrac_loctypes"].split(","):
        k = int(cfg["afrac"] * x.shape[-1])
        ret = torch.zeros_like(x)
        _, inds = torch.topk(x.abs(), k, dim=-1, sorted=False)
        ret.scatter_(-1, inds, x.gather(-1, inds))
        return ret
    return x


def _norm(cfg: dict, sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    if cfg["rms_norm"]:  # nn.RMSNorm(d_model): eps=None, i.e. torch.finfo(x.dtype).eps
        return F.rms_norm(x, x.shape[-1:], sd[f"{name}.weight"])
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd.get(f"{name}.bias"), 1e-5)


def _linear(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _attention(cfg: dict, sd: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    H, D = cfg["n_head"], cfg["d_head"]
    x = maybe_activation_sparsity(cfg, x, "attn_in")
    q, k, v = _linear(sd, f"{p}.c_attn", x).split(H * D, dim=2)
    k = maybe_activation_sparsity(cfg, k, "attn_k")
    q = maybe_activation_sparsity(cfg, q, "attn_q")
    v = maybe_activation_sparsity(cfg, v, "attn_v")
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
    scale = 1.0 / math.sqrt(D)
    if cfg["sink"]:  # SDPAWithSink: a zero key/value slot in front, always visible, logit = sink_logit per head
        k = torch.cat([q.new_zeros(B, H, 1, D), k], dim=2)
        v = torch.cat([v.new_zeros(B, H, 1, D), v], dim=2)
        allow = torch.ones(T, T + 1, dtype=torch.bool, device=q.device)
        allow[:, 1:] = allow[:, 1:].tril()
        mask = torch.where(allow, 0.0, torch.finfo(q.dtype).min).to(q.dtype).expand(B, H, T, T + 1).clone()
        mask[..., 0] += sd[f"{p}.attn_imp.sink_logit"].to(q.dtype).view(1, H, 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False, scale=scale)
    else:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    y = _linear(sd, f"{p}.c_proj", y.transpose(1, 2).contiguous().view(B, T, H * D))
    return maybe_activation_sparsity(cfg, y, "attn_out")


def _mlp(cfg: dict, sd: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    x = maybe_activation_sparsity(cfg, x, "mlp_in")
    x = {"gelu": F.gelu, "relu": F.relu}[cfg["activation_type"]](_linear(sd, f"{p}.c_fc", x))
    x = maybe_activation_sparsity(cfg, x, "mlp_neuron")
    return maybe_activation_sparsity(cfg, _linear(sd, f"{p}.c_proj", x), "mlp_out")


@torch.no_grad()
def paper_forward(beeg_config: dict, state_dict: dict, idx: torch.Tensor) -> torch.Tensor:
    """Token ids (B, T) -> logits (B, T, vocab), as GPT.forward of the released code computes them."""
    cfg, sd = load_config(beeg_config), state_dict
    T = idx.shape[1]
    assert T <= cfg["block_size"], f"Cannot forward sequence of length {T}, block size is {cfg['block_size']}"
    wte = sd["lm_head.weight"] if cfg["tied_unembed"] else sd["transformer.wte.weight"]
    x = F.embedding(idx, wte) + sd["transformer.wpe.weight"][:T].unsqueeze(0)
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}"
        for norm, sub, fn, loc in (("ln_1", "attn", _attention, "resid_post_attn"),
                                   ("ln_2", "mlp", _mlp, "resid_post_mlp")):
            x = x + fn(cfg, sd, f"{p}.{sub}", _norm(cfg, sd, f"{p}.{norm}", x))
            if cfg["residual_activation_type"] == "relu":
                x = torch.relu(x)
            x = maybe_activation_sparsity(cfg, x, loc)
    x = _norm(cfg, sd, "transformer.ln_f", x)
    vocab = cfg["vocab_size"]
    logits = F.linear(x, sd["lm_head.weight"]) + sd.get("final_logits_bias", torch.zeros(vocab))
    if cfg["enable_bigram_table"]:  # a buffer/parameter initialised to zeros, loaded with strict=False
        logits = logits + F.embedding(idx, sd.get("bigram_table", torch.zeros(vocab, vocab))).to(x.dtype)
    return logits
