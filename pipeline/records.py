"""Record types: what analysis reads (DESIGN.md: records are the contract). Changing a field means
changing its reader and test in the same commit.

Records are plain dataclasses with named fields, written as indented JSON with named keys and read
back through `from_dict`; `JsonRecord` gives each one the same save / load / to_json / from_json.
"""

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Self, TypeVar

import numpy as np

# unreachable: the whole model misses the target; direct: the empty circuit (the bigram table alone,
# calibrated) already reaches it, so the task says nothing about circuits in this model
CircuitStatus = Literal["pending", "found", "unreachable", "direct"]
NodeKey = tuple[int, str, int]  # (layer, kind, index): model/graph.py's node address
T = TypeVar("T")


class JsonRecord:
    """The one JSON reader and writer of the record types below."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    def save(self, path: Path) -> None:
        path.write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict) -> Self:
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Self:
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: Path) -> Self:
        return cls.from_json(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class NodeRecord:
    """A kept node (model/graph.py's address) and its mean activation over pretraining data."""

    layer: int
    kind: str
    index: int
    mean: float

    @property
    def key(self) -> NodeKey:
        return (self.layer, self.kind, self.index)


@dataclass(frozen=True)
class EdgeRecord:
    """A nonzero weight between two kept nodes; a "logit" destination's index is its token id."""

    src_layer: int
    src_kind: str
    src_index: int
    dst_layer: int
    dst_kind: str
    dst_index: int
    weight: float

    @property
    def src(self) -> NodeKey:
        return (self.src_layer, self.src_kind, self.src_index)

    @property
    def dst(self) -> NodeKey:
        return (self.dst_layer, self.dst_kind, self.dst_index)


@dataclass(frozen=True)
class CurvePoint:
    """The circuit at another target loss along the same node ranking (Figure 2): k nodes with `edges`
    edges; both None where even the whole model misses the target."""

    target: float
    k: int | None
    edges: int | None


def _entries(cls: type[T], entries: list[dict | list]) -> list[T]:
    """Typed records from a list of JSON entries. Files written before the typed records stored each node,
    edge and curve point as a positional list ([layer, kind, index, mean] etc., in field order): read those
    positionally so a study started before the change can still be resumed and reported."""
    return [cls(*e) if isinstance(e, list) else cls(**e) for e in entries]


@dataclass(frozen=True)
class CircuitSummary(JsonRecord):
    """What the trial record keeps of one task's circuit (`CircuitRecord.summary`)."""

    status: CircuitStatus
    nodes: int  # how many nodes the circuit keeps
    edges: int
    unpruned_loss: float
    target_loss: float
    sufficiency_loss: float | None
    necessity_loss: float | None
    target_curve: list[CurvePoint] = field(default_factory=list)
    empty_loss: float | None = None  # (fields from here on: absent in records written before them)
    random_loss: float | None = None
    random_edges: int | None = None
    attribution_edges: int | None = None
    test_accuracy: float | None = None  # the whole model's held-out accuracy on the task

    @classmethod
    def from_dict(cls, data: dict) -> "CircuitSummary":
        return cls(**data | {"target_curve": _entries(CurvePoint, data["target_curve"])})


@dataclass
class CircuitRecord(JsonRecord):
    """One task's circuit in one model (METHOD.md 4)."""

    task: str
    target_loss: float
    unpruned_loss: float  # held-out task loss of the whole model
    total_nodes: int
    status: CircuitStatus = "pending"
    empty_loss: float | None = None  # held-out loss of the empty circuit, calibrated on the train pairs
    nodes: list[NodeRecord] = field(default_factory=list)  # by importance
    edges: int = 0  # nonzero weights between kept nodes (model/graph.py)
    edge_list: list[EdgeRecord] = field(default_factory=list)
    # held-out losses; "calibrated": under the logit scale fit on the train pairs
    sufficiency_loss: float | None = None  # circuit alone, everything else mean-ablated (calibrated)
    necessity_loss: float | None = None  # only the circuit mean-ablated
    random_loss: float | None = None  # a random circuit of the same size (calibrated)
    random_edges: int | None = None
    attribution_edges: int | None = None  # the gradient-attribution baseline at the same target
    target_curve: list[CurvePoint] = field(default_factory=list)  # at each prune.curve_targets (Figure 2)
    seconds: float = 0.0

    @classmethod
    def from_dict(cls, data: dict) -> "CircuitRecord":
        return cls(**data | {"nodes": _entries(NodeRecord, data["nodes"]),
                             "edge_list": _entries(EdgeRecord, data["edge_list"]),
                             "target_curve": _entries(CurvePoint, data["target_curve"])})

    def summary(self, test_accuracy: float | None = None) -> CircuitSummary:
        return CircuitSummary(status=self.status, nodes=len(self.nodes), edges=self.edges,
                              unpruned_loss=self.unpruned_loss, target_loss=self.target_loss,
                              sufficiency_loss=self.sufficiency_loss, necessity_loss=self.necessity_loss,
                              target_curve=list(self.target_curve), empty_loss=self.empty_loss,
                              random_loss=self.random_loss, random_edges=self.random_edges,
                              attribution_edges=self.attribution_edges, test_accuracy=test_accuracy)


TRIAL_FILE = "trial.json"  # a TrialRecord, in each trial's run folder and as its MLflow artifact
LR_SEARCH_FILE = "lr_search.json"  # in a study folder: each point's chosen LR and every rung's losses


@dataclass
class TrialRecord(JsonRecord):
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
    circuits: dict[str, CircuitSummary] = field(default_factory=dict)  # by task
    seed: int = 0  # train.seed (fields from here on: absent in records written before them)
    lr: float | None = None  # train.lr, the peak learning rate the trial trained with
    task_accuracy: dict[str, float] = field(default_factory=dict)  # held-out accuracy of the whole model, by task

    @property
    def dense(self) -> bool:
        return self.density >= 1.0

    @property
    def point(self) -> str:
        """The study point the trial trained: its name without the seed (sweeps/spec.py's trial_name), what
        the seeds of one point share."""
        return re.sub(r"-seed=-?\d+$", "", self.trial)

    @classmethod
    def from_dict(cls, data: dict) -> "TrialRecord":
        return cls(**data | {"circuits": {t: CircuitSummary.from_dict(c) for t, c in data["circuits"].items()}})


def edge_geomean(edges: Iterable[int]) -> float | None:
    """Geometric mean of circuit edge counts, an empty circuit counting as 1 edge so logs stay finite;
    None for no circuits."""
    values = [max(e, 1) for e in edges]
    return float(np.exp(np.mean(np.log(values)))) if values else None


def geometric_mean_edges(circuits: Iterable[CircuitRecord | CircuitSummary]) -> float | None:
    """The study's interpretability metric (METHOD.md 4) over the circuits that were found."""
    return edge_geomean(c.edges for c in circuits if c.status == "found")
