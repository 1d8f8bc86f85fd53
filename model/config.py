"""Model shape and sparsity settings (METHOD.md sections 2 and 3).

Validators raise `ValueError("<key>: <rule>, got <value>")`; the composing config turns that into a
one-line user error. Derived sizes are functions, never stored twice.
"""

from dataclasses import dataclass


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    d_model: int = 128
    num_layers: int = 4
    d_head: int = 16  # METHOD.md 2: small heads gave more monosemantic heads
    mlp_ratio: int = 4
    context_length: int = 256  # METHOD.md 2: the paper's context


@dataclass(kw_only=True, frozen=True)
class SparsityConfig:
    density: float = 1.0  # weight-matrix density; 1.0 is the dense baseline
    neuron_floor: int = 4  # METHOD.md 3: j = 4 entries kept per neuron before the global top-k
    anneal_start: float = 0.01  # fraction of training where the L0 anneal begins (METHOD.md 3)
    anneal_end: float = 0.5  # ... and where it reaches the target density
    sparse_biases: bool = False  # the paper says sparse, its released script keeps them dense


def check_model_config(cfg: ModelConfig) -> None:
    for key in ("d_model", "num_layers", "d_head", "mlp_ratio"):
        value = getattr(cfg, key)
        if value < 1:
            raise ValueError(f"model.{key}: must be a positive integer, got {value}")
    if cfg.d_model % cfg.d_head:
        raise ValueError(
            f"model.d_model: must be divisible by model.d_head={cfg.d_head}, got {cfg.d_model}"
        )
    if cfg.context_length < 2:
        raise ValueError(f"model.context_length: must be at least 2, got {cfg.context_length}")


def check_sparsity_config(cfg: SparsityConfig) -> None:
    if not 0.0 < cfg.density <= 1.0:
        raise ValueError(f"sparsity.density: must lie in (0, 1], got {cfg.density}")
    if cfg.neuron_floor < 0:
        raise ValueError(f"sparsity.neuron_floor: must be >= 0, got {cfg.neuron_floor}")
    if not 0.0 <= cfg.anneal_start <= cfg.anneal_end <= 1.0:
        raise ValueError(
            "sparsity.anneal_start: need 0 <= anneal_start <= anneal_end <= 1, "
            f"got {cfg.anneal_start} and {cfg.anneal_end}"
        )
