"""Record types: what analysis reads (DESIGN.md: records are the contract). Changing a field means
changing its reader and test in the same commit."""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class CircuitRecord:
    """One task's circuit in one model (METHOD.md 4)."""

    task: str
    target_loss: float
    unpruned_loss: float  # held-out task loss of the whole model
    total_nodes: int
    status: str = "pending"  # found | unreachable (the whole model misses the target)
    nodes: list[list] = field(default_factory=list)  # [layer, kind, index, mean activation], by importance
    edges: int = 0  # nonzero weights between kept nodes (model/graph.py)
    # [src layer, src kind, src index, dst layer, dst kind, dst index (token id for "logit"), weight]
    edge_list: list[list] = field(default_factory=list)
    sufficiency_loss: float | None = None  # circuit alone, everything else mean-ablated (calibrated)
    necessity_loss: float | None = None  # only the circuit mean-ablated
    random_loss: float | None = None  # a random circuit of the same size (calibrated)
    random_edges: int | None = None
    attribution_edges: int | None = None  # the gradient-attribution baseline at the same target
    seconds: float = 0.0

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "CircuitRecord":
        return cls(**json.loads(path.read_text(encoding="utf-8")))
