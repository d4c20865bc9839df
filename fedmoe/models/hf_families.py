"""The transformers MoE families fedmoe federates, and what it checks of a model folder before
anything is imported (run config ``hf-model`` and ``model-path``; fedmoe.models.hf_moe builds the models).

Attribute names as transformers 5.23 spells them in each family's config class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..data.text import VOCAB_SIZE


@dataclass(frozen=True)
class Family:
    """How one transformers MoE family names things."""

    model_type: str  # config.model_type
    config_class: str
    model_class: str
    num_experts_attr: str  # config attribute: experts per sparse layer
    expert_hidden_attr: str  # config attribute: I, the experts' intermediate width
    always_renormalise: bool  # top-k probabilities renormalised to sum 1 regardless of norm_topk_prob
    shared_expert: bool  # a dense expert beside the routed ones (Qwen2-MoE)
    sparse_step: bool  # mlp_only_layers / decoder_sparse_step can make layers dense (Qwen2/3-MoE)


FAMILIES: dict[str, Family] = {
    "mixtral": Family("mixtral", "MixtralConfig", "MixtralForCausalLM", "num_local_experts", "intermediate_size",
                      True, False, False),
    "qwen2-moe": Family("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", "num_experts", "moe_intermediate_size",
                        False, True, True),
    "qwen3-moe": Family("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", "num_experts", "moe_intermediate_size",
                        False, False, True),
    "olmoe": Family("olmoe", "OlmoeConfig", "OlmoeForCausalLM", "num_experts", "intermediate_size", False, False, False),
}


def family_of(hf_config) -> tuple[str, Family]:
    """(run-config name, Family) of a transformers config object or a config.json dict."""
    model_type = hf_config["model_type"] if isinstance(hf_config, dict) else hf_config.model_type
    for name, family in FAMILIES.items():
        if family.model_type == model_type:
            return name, family
    raise ValueError(f"model type {model_type!r} is not a supported MoE family ({', '.join(FAMILIES)})")


def sparse_layers(config: dict, family: Family) -> int:
    """Decoder layers with a sparse MoE block (transformers' rule for Qwen2/3-MoE)."""
    layers = config["num_hidden_layers"]
    if not family.sparse_step:
        return layers
    dense, step = set(config.get("mlp_only_layers") or []), config.get("decoder_sparse_step", 1)
    return sum(1 for i in range(layers) if i not in dense and step > 0 and (i + 1) % step == 0)


def model_path_problems(model_path: str, num_experts: int, top_k: int, num_moe_layers: int, seq_len: int) -> list[str]:
    """One line per way the folder's config.json disagrees with the run config (which sizes the
    routing counts, the active-set rule and the expert ids before any model is built)."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        return [f"run config 'model-path': no config.json in {model_path!r} (a save_pretrained folder)"]
    config = json.loads(path.read_text())
    try:
        _, family = family_of(config)
    except ValueError as exc:
        return [f"run config 'model-path': {exc}"]
    problems = []
    shape = {"num-experts": config.get(family.num_experts_attr), "top-k": config.get("num_experts_per_tok"),
             "num-moe-layers": sparse_layers(config, family)}
    given = {"num-experts": num_experts, "top-k": top_k, "num-moe-layers": num_moe_layers}
    for key, value in shape.items():
        if value != given[key]:
            problems.append(f"run config '{key}': the model at model-path has {value}; set {key}={value}, got {given[key]}")
    if config.get("vocab_size", 0) < VOCAB_SIZE:
        problems.append(f"run config 'model-path': the model's vocabulary ({config.get('vocab_size')}) cannot hold "
                        f"the {VOCAB_SIZE} byte tokens")
    if config.get("max_position_embeddings", seq_len) < seq_len:
        problems.append(f"run config 'seq-len': the model at model-path takes at most "
                        f"{config['max_position_embeddings']} positions, got {seq_len}")
    return problems
