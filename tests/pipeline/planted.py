"""A one-layer GPT with a circuit planted by hand, its task and its node means (for pruning tests).

Every weight is zero except these. The cue token (X or Y, a prompt's last token) writes +1 or -1 on
residual channel CUE; MLP neuron 0 reads that channel through ln_2 (it fires on X only), writes channel
OUT, and the unembedding reads OUT through ln_f into the logit of P (+) and of Q (-). The bigram table
gives Q the same head start after X as after Y (it is no node and cannot tell them apart), so a pair
(X -> P, Y -> Q) is solved only through the planted path:

    (-1, embed, CUE) -> (0, mlp_in, CUE) -> (0, mlp_neuron, 0) -> (0, mlp_out, OUT) -> (1, final, OUT)

Every token also writes a constant on channel ONE, so the norms' outputs depend on the size of the cue
channel, not only on its sign (a vector with one nonzero channel normalises to +-sqrt(d) there). Neuron 1
is harmful: it fires on X too and writes against the path (mildly, so that the whole model still reaches
the target uncalibrated, as pruning requires). Every other node is irrelevant: attention is
all zero (q, k, v, attn_out are zero), the other neurons and channels carry nothing the logits read.
"""

import torch

from model.config import ModelConfig
from model.gpt import GPT
from model.graph import Location
from pipeline.prune import node_means
from pipeline.tasks import EncodedTask

Z, X, Y, P, Q, PAD = 0, 1, 2, 3, 4, 7  # filler, the two cues, the two answers, padding (vocab 8)
VOCAB = 8
CUE, OUT, ONE = 0, 1, 7  # residual channels
PLANTED: list[tuple[int, str, int]] = [(-1, "embed", CUE), (0, "mlp_in", CUE), (0, "mlp_neuron", 0),
                                       (0, "mlp_out", OUT), (1, "final", OUT)]
HARMFUL = (0, "mlp_neuron", 1)
TARGET = 0.1  # far below ln 2, the loss of any circuit that cannot tell X from Y


def planted_model() -> GPT:
    model = GPT(ModelConfig(d_model=8, num_layers=1, d_head=4, mlp_ratio=1, context_length=4, bias=False), VOCAB)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.zero_()  # every matrix, the embedding and the bigram table; norm gains stay 1
        wte = model.transformer["wte"].weight
        wte[:, ONE] = 4.0
        wte[X, CUE], wte[Y, CUE] = 1.0, -1.0
        mlp = model.transformer["h"][0].mlp
        mlp.c_fc.weight[0, CUE], mlp.c_proj.weight[OUT, 0] = 4.0, 1.0  # the planted neuron
        mlp.c_fc.weight[1, CUE], mlp.c_proj.weight[OUT, 1] = 4.0, -0.2  # the harmful one
        model.lm_head.weight[P, OUT], model.lm_head.weight[Q, OUT] = 1.9, -1.9
        model.bigram_table[X, Q] = model.bigram_table[Y, Q] = 3.0
    return model.eval()


def planted_task(pairs: int = 8) -> EncodedTask:
    """`pairs` copies of the pair (Z X -> P rather than Q, Z Y -> Q rather than P)."""
    return EncodedTask("planted", [[Z, X], [Z, Y]] * pairs, torch.tensor([[P, Q], [Q, P]] * pairs))


class RandomTokens:
    """Pretraining data for the node means: uniform random tokens, (4, 5) windows, batch i seeded by i."""

    def batch(self, step: int) -> torch.Tensor:
        return torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(step))


def planted_means(model: GPT) -> dict[Location, torch.Tensor]:
    return node_means(model, RandomTokens(), 4, "pooled")


def as_ranking(nodes: list[tuple[int, str, int]]) -> list[tuple[Location, int]]:
    """Nodes in the ranking form pruning uses: ((layer, kind), index)."""
    return [((layer, kind), index) for layer, kind, index in nodes]
