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
    # [target loss, k, edges] along the same node ranking at each prune.curve_targets (Figure 2); k and
    # edges are None where even the whole model misses that target
    target_curve: list[list] = field(default_factory=list)
    seconds: float = 0.0

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "CircuitRecord":
        return cls(**json.loads(path.read_text(encoding="utf-8")))


TRIAL_FILE = "trial.json"  # a TrialRecord, in each trial's run folder and as its MLflow artifact


@dataclass
class TrialRecord:
    """One trained-and-pruned trial of a study (`trial.json` in its run folder): what the frontier needs."""

    trial: str
    study: str
    d_model: int
    num_layers: int
    density: float
    params_total: int  # every weight of the model
    l0_total: float  # nonzero weights after training (the paper's L0)
    val_loss: float  # pretraining validation loss (nats per token)
    residual_kurtosis: float
    task_accuracy_mean: float
    circuit_edges_geomean: float | None  # over the tasks whose circuit this trial found
    circuits_found: int
    circuits_tried: int
    overlap_nodes_mean: float | None  # mean Jaccard of node sets over pairs of distinct found circuits
    train_seconds: float
    prune_seconds: float
    # task -> {status, nodes, edges, unpruned_loss, target_loss, sufficiency_loss, necessity_loss, target_curve}
    circuits: dict[str, dict] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "TrialRecord":
        return cls(**json.loads(path.read_text(encoding="utf-8")))
