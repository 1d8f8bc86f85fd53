"""Model shape and sparsity settings (METHOD.md sections 2 and 3), and the paper's size bookkeeping.

Validators raise `ValueError("<key>: <rule>, got <value>")`; the composing config turns that into a
one-line user error. Derived sizes are functions, never stored twice.
"""

from dataclasses import dataclass, field
from typing import Literal

NodeLocation = Literal["attn_in", "q", "k", "v", "attn_out", "mlp_in", "mlp_neuron", "mlp_out"]
NODE_LOCATIONS: tuple[str, ...] = ("attn_in", "q", "k", "v", "attn_out", "mlp_in", "mlp_neuron", "mlp_out")


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    d_model: int = 128
    num_layers: int = 4
    d_head: int = 16  # METHOD.md 2: small heads gave more monosemantic heads
    mlp_ratio: int = 4
    context_length: int = 256  # METHOD.md 2: the paper's context
    bias: bool = True  # linear layers have biases (METHOD.md 2)
    pos_embedding: Literal["none", "learned"] = "none"  # the paper mostly uses none
    attention_sink: bool = False  # a learnable per-head logit for an extra all-zero key/value slot
    bigram_table: Literal["learnable", "fixed", "none"] = "learnable"  # dense vocab x vocab logits table
    # AbsTopK activation sparsity (METHOD.md 3): keep this fraction per token at each location; 1.0 = off.
    # The paper uses 1/4, its released sweep models 1/8.
    afrac: float = 1.0
    afrac_locations: list[NodeLocation] = field(default_factory=lambda: list(NODE_LOCATIONS))
    init_std: float = 0.02
    # Kernel set (kernels/dispatch.py): auto = cuda on a GPU, cpu otherwise; triton = every Triton
    # kernel; reference = the plain-torch twins.
    kernels: Literal["auto", "cuda", "triton", "cpu", "reference"] = "auto"


@dataclass(kw_only=True, frozen=True)
class SparsityConfig:
    density: float = 1.0  # weight-matrix density; 1.0 is the dense baseline
    # Embedding / unembedding density; None = the matrix density (the paper scales it as pfrac / ef).
    embedding_density: float | None = None
    neuron_floor: int = 4  # METHOD.md 3: j = 4 entries kept per neuron before the global top-k
    anneal_start: float = 0.01  # fraction of training where the L0 anneal begins (METHOD.md 3)
    anneal_end: float = 0.5  # ... and where it reaches the target density (0.8 for the largest models)
    anneal_shape: Literal["linear", "power"] = "linear"
    anneal_power: float = 2.0  # power shape: density = target + (1 - target) * (1 - progress) ** power
    sparse_biases: bool = False  # the paper says sparse, its released script keeps them dense
    # exact: dense products on masked weights (the paper's recipe); sparse: matrices whose density the
    # dispatch rule takes (kernels/sparse_compute.py, CROSSOVER) train through their nonzeros and a candidate
    # set (Top-KAST / RigL), with a dense-gradient regrow step every `regrow_every` steps
    compute: Literal["exact", "sparse"] = "exact"
    regrow_every: int = 100
    candidates: float = 1.0  # candidate entries per kept entry in the sparse step's active set


def d_mlp(cfg: ModelConfig) -> int:
    return cfg.mlp_ratio * cfg.d_model


def num_heads(cfg: ModelConfig) -> int:
    return cfg.d_model // cfg.d_head


def location_width(cfg: ModelConfig, location: str) -> int:
    """Channels at an activation location: the MLP's hidden width for `mlp_neuron`, d_model elsewhere
    (q, k and v span all heads: num_heads x d_head = d_model)."""
    return d_mlp(cfg) if location == "mlp_neuron" else cfg.d_model


def abstopk_k(afrac: float, width: int) -> int:
    """Entries AbsTopK keeps per token: int(afrac x width), truncated as the paper's released code does
    (circuit_sparsity/inference/gpt.py, `maybe_activation_sparsity`), so exports compute what it computes."""
    return int(afrac * width)


def param_counts(cfg: ModelConfig, vocab_size: int) -> dict[str, int]:
    """Parameter counts by group; `total` excludes the bigram table as the paper's sizes do."""
    d, h, layers = cfg.d_model, d_mlp(cfg), cfg.num_layers
    per_layer_matrices = 3 * d * d + d * d + 2 * d * h
    per_layer_biases = (3 * d + d + h + d) if cfg.bias else 0
    counts = {
        "matrices": layers * per_layer_matrices,
        "embeddings": 2 * vocab_size * d + (cfg.context_length * d if cfg.pos_embedding == "learned" else 0),
        "biases": layers * per_layer_biases,
        "norms": (2 * layers + 1) * d,
        "sinks": layers * num_heads(cfg) if cfg.attention_sink else 0,
    }
    counts["total"] = sum(counts.values())
    counts["bigram_table"] = vocab_size * vocab_size if cfg.bigram_table != "none" else 0
    return counts


def min_density(model: ModelConfig, sparsity: SparsityConfig) -> float:
    """Smallest matrix density at which every neuron keeps its floor of j entries: j x neurons <= k.

    Each of the four floored projections has j x neurons / numel = j / d_model (METHOD.md 3).
    """
    return sparsity.neuron_floor / model.d_model


def check_model_config(cfg: ModelConfig) -> None:
    for key in ("d_model", "num_layers", "d_head", "mlp_ratio"):
        value = getattr(cfg, key)
        if value < 1:
            raise ValueError(f"model.{key}: must be a positive integer, got {value}")
    if cfg.d_model % cfg.d_head:
        raise ValueError(f"model.d_model: must be divisible by model.d_head={cfg.d_head}, got {cfg.d_model}")
    if cfg.context_length < 2:
        raise ValueError(f"model.context_length: must be at least 2, got {cfg.context_length}")
    if not 0.0 < cfg.afrac <= 1.0:
        raise ValueError(f"model.afrac: must lie in (0, 1], got {cfg.afrac}")
    if cfg.afrac < 1.0:
        for location in cfg.afrac_locations:
            width = location_width(cfg, location)
            if abstopk_k(cfg.afrac, width) == 0:
                raise ValueError(f"model.afrac: {cfg.afrac:g} keeps int(afrac x {width}) = 0 of the {width} channels "
                                 f"at {location}; raise it so that afrac x {width} >= 1")
    if len(set(cfg.afrac_locations)) != len(cfg.afrac_locations):
        raise ValueError(f"model.afrac_locations: lists a location twice: {cfg.afrac_locations}")
    if cfg.init_std <= 0:
        raise ValueError(f"model.init_std: must be > 0, got {cfg.init_std}")


def check_sparsity_config(cfg: SparsityConfig) -> None:
    if not 0.0 < cfg.density <= 1.0:
        raise ValueError(f"sparsity.density: must lie in (0, 1], got {cfg.density}")
    if cfg.embedding_density is not None and not 0.0 < cfg.embedding_density <= 1.0:
        raise ValueError(f"sparsity.embedding_density: must lie in (0, 1] or be null, got {cfg.embedding_density}")
    if cfg.neuron_floor < 0:
        raise ValueError(f"sparsity.neuron_floor: must be >= 0, got {cfg.neuron_floor}")
    if not 0.0 <= cfg.anneal_start <= cfg.anneal_end <= 1.0:
        raise ValueError(
            "sparsity.anneal_start: need 0 <= anneal_start <= anneal_end <= 1, "
            f"got {cfg.anneal_start} and {cfg.anneal_end}"
        )
    if cfg.anneal_power <= 0:
        raise ValueError(f"sparsity.anneal_power: must be > 0, got {cfg.anneal_power}")
    if cfg.compute not in ("exact", "sparse"):
        raise ValueError(f"sparsity.compute: must be exact or sparse, got {cfg.compute!r}")
    if cfg.regrow_every < 1:
        raise ValueError(f"sparsity.regrow_every: must be a positive number of steps, got {cfg.regrow_every}")
    if not cfg.candidates > 0:
        raise ValueError(f"sparsity.candidates: must be > 0 (candidates per kept entry), got {cfg.candidates}")


def check_sparsity_fits(model: ModelConfig, sparsity: SparsityConfig) -> None:
    """The per-neuron floor must fit in every floored matrix's budget k (METHOD.md 3)."""
    if sparsity.density >= 1.0 or sparsity.neuron_floor == 0:
        return
    smallest = min_density(model, sparsity)
    if sparsity.density < smallest:
        raise ValueError(
            f"sparsity.density: {sparsity.density:g} cannot hold the per-neuron floor of the MLP and "
            f"attention projections (j={sparsity.neuron_floor} x neurons > k at d_model={model.d_model}); "
            f"smallest allowed density is {smallest:g} = j/d_model (or lower sparsity.neuron_floor)"
        )
