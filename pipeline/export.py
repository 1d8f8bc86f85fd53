"""Model export: our own layout (safetensors weights + resolved config + tokenizer) and the layout of
the paper's released inference code (`beeg_config.json` + `final_model.pt`, specified in
shared/FORMAT-paper-checkpoint.md), so tools built for the paper's models can read ours.

Our module names already follow the paper's (`transformer.h.{i}.attn.c_attn`, ...); the paper layout
adds an all-zero position table when there is none, a zero `final_logits_bias`, and renames the
attention sink. AbsTopK keeps int(afrac x dim) entries per token, truncated as the released code's
`maybe_activation_sparsity` does (model/config.py `abstopk_k`), so an export with afrac < 1 computes the
same logits under the paper's forward (tests/pipeline/test_export.py).
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.config import d_mlp, num_heads
from model.gpt import GPT
from pipeline.data import Dataset

# our location names -> the paper's afrac_loctypes names
LOCATION_NAMES = {"attn_in": "attn_in", "q": "attn_q", "k": "attn_k", "v": "attn_v", "attn_out": "attn_out",
                  "mlp_in": "mlp_in", "mlp_neuron": "mlp_neuron", "mlp_out": "mlp_out"}


def export_model(model: GPT, config_yaml: str, dataset: Dataset, folder: Path) -> Path:
    """Write `folder/model.safetensors`, `config.yaml`, `tokenizer.json` and `folder/paper/`."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.yaml").write_text(config_yaml, encoding="utf-8")
    shutil.copyfile(dataset.folder / "tokenizer.json", folder / "tokenizer.json")
    paper = folder / "paper"
    paper.mkdir(exist_ok=True)
    name = f"circuitscale-bpe-{dataset.manifest['tokenizer']['sha256'][:12]}"
    (paper / "beeg_config.json").write_text(json.dumps(paper_config(model, name), indent=2) + "\n")
    torch.save(paper_state_dict(model), paper / "final_model.pt")
    return folder


def paper_config(model: GPT, tokenizer_name: str) -> dict:
    cfg = model.cfg
    sparse_acts = cfg.afrac < 1.0
    return {
        "block_size": cfg.context_length,
        "vocab_size": model.vocab_size,
        "n_layer": cfg.num_layers,
        "n_head": num_heads(cfg),
        "d_head": cfg.d_head,
        "d_model": cfg.d_model,
        "d_mlp": d_mlp(cfg),
        "dropout": 0.0,
        "bias": cfg.bias,
        "ln_bias": False,
        "rms_norm": True,
        "residual_activation_type": "identity",
        "activation_type": "gelu",
        "afrac": cfg.afrac if sparse_acts else None,
        "afrac_loctypes": ",".join(LOCATION_NAMES[x] for x in cfg.afrac_locations) if sparse_acts else "",
        "tied_unembed": False,
        "tokenizer_name": tokenizer_name,
        "grad_checkpointing": False,
        "flash": False,
        "enable_bigram_table": cfg.bigram_table != "none",
        "learnable_bigram_table": cfg.bigram_table == "learnable",
        "d_pos_emb": None,
        "sinusoidal_cat_pos_emb": False,
        "dropout_cat_pos_emb": False,
        "sink": cfg.attention_sink,
        "debug_nans": False,
        "enable_sparse_kernels": False,
    }


def paper_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    state = {}
    for key, value in model.state_dict().items():
        key = key.replace(".attn.sink_logit", ".attn.attn_imp.sink_logit")
        state[key] = value.detach().contiguous().cpu().clone()
    state.setdefault("transformer.wpe.weight", torch.zeros(cfg.context_length, cfg.d_model))
    state["final_logits_bias"] = torch.zeros(model.vocab_size)
    return state
