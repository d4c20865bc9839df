"""Hugging Face ``transformers`` MoE language models as fedmoe models (the ``hf-moe`` task).

Supported families (transformers 5.x layout, checked against 5.23.0): Mixtral, Qwen2-MoE (with a
shared expert), Qwen3-MoE and OLMoE. In each sparse decoder layer ``mlp`` holds a router
``gate.weight`` [E, H] and fused experts ``experts.gate_up_proj`` [E, 2I, H] (gate rows then up
rows) and ``experts.down_proj`` [E, H, I]; the stock block flattens tokens to [N*S, H], so
nothing that sees its inputs knows which sample a token came from.

``HFMoECausalLM`` replaces every sparse block by ``SparseMoEBlock``, which keeps [N, S, H]
throughout and holds each expert's slices as parameters of their own (``SwiGLUExpertBank``:
``gate_up_{e}`` = gate_up_proj[e], ``down_{e}`` = down_proj[e]). That is what makes the rest of
fedmoe work unchanged:
  * an expert is frozen by ``requires_grad=False`` on its own tensors: they are then in no
    optimiser (so Adam moments and weight decay cannot move them) and get no DP noise, i.e.
    inactive slices stay bit-identical, which masking the gradient of a fused tensor does not give;
  * Opacus sees batch-first modules: the router is an ``nn.Linear`` on [N, S, H], the bank has
    its own grad and norm samplers (fedmoe.privacy), attention and embeddings are stock;
  * a reply carries exactly the active experts' slices, keyed ``moe_layers.{l}.experts.gate_up_{e}``
    (fedmoe.federation.wire.expert_id), plus the shared tensors (attention, norms, embeddings, router, shared
    expert), and the server averages each slice over the sites that trained it.

Routing follows the family: softmax over all E router logits, top-k, then renormalised to sum 1
(Mixtral always; the others when ``norm_topk_prob``). The router losses are fedmoe's per-sample ones
(fedmoe.models.moe.router_losses, weights aux-loss-weight and z-loss-weight), not the library's
batch-pooled load-balancing loss, whose value for one sample depends on the others.

``to_hf`` writes the slices back into the family's own model class, so the result saves with
``save_pretrained`` and loads with ``AutoModelForCausalLM.from_pretrained``. transformers is
imported only when a model is built or loaded.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .hf_families import FAMILIES, Family, family_of
from .moe import MoEBlockConfig, RoutingStats, dispatch_to_experts, router_losses


@dataclass
class HFMoEConfig(MoEBlockConfig):
    """The shape fedmoe needs of a wrapped model (read from the HF config, not from the run config)."""

    family: str = "mixtral"
    seq_len: int = 64

    @property
    def num_tokens(self) -> int:
        """Tokens per sample (what one example contributes to the routing counts)."""
        return self.seq_len


class SwiGLUExpertBank(nn.Module):
    """E SwiGLU experts without biases, one set of tensors per expert, as transformers computes them.

    ``gate_up_{e}`` [2I, H] (rows :I gate, I: up), ``down_{e}`` [H, I]; expert e maps a token x [H]
    to down_e (silu(gate x) * (up x)). forward: x [N, T, H], expert_index [N, T] (long) -> [N, T, H].

    With ``lora_rank`` r > 0 each expert also has LoRA factors of its own, ``gate_up_a_{e}`` [r, H],
    ``gate_up_b_{e}`` [2I, r], ``down_a_{e}`` [r, I], ``down_b_{e}`` [H, r], and computes with
    W + (alpha / r) B A (B starts at zero, A as nn.Linear's init: peft's convention). The factors are
    then what ``expert_params`` names, i.e. what a site trains and sends for the expert; the base
    slices (``base_params``) are never trained.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, lora_rank: int = 0, lora_alpha: float = 0.0) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate = intermediate
        self.lora_rank = lora_rank
        self.lora_scale = lora_alpha / lora_rank if lora_rank else 0.0
        for e in range(num_experts):
            self.register_parameter(f"gate_up_{e}", nn.Parameter(torch.empty(2 * intermediate, hidden)))
            self.register_parameter(f"down_{e}", nn.Parameter(torch.empty(hidden, intermediate)))
            if lora_rank:
                for name, (out_features, in_features) in {"gate_up": (2 * intermediate, hidden), "down": (hidden, intermediate)}.items():
                    a = torch.empty(lora_rank, in_features)
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                    self.register_parameter(f"{name}_a_{e}", nn.Parameter(a))
                    self.register_parameter(f"{name}_b_{e}", nn.Parameter(torch.zeros(out_features, lora_rank)))

    def base_params(self, e: int) -> tuple[nn.Parameter, nn.Parameter]:
        """(gate_up [2I, H], down [H, I]) of expert e as loaded: the library's slices."""
        return getattr(self, f"gate_up_{e}"), getattr(self, f"down_{e}")

    def lora_params(self, e: int) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter, nn.Parameter]:
        """(gate_up A, gate_up B, down A, down B) of expert e."""
        return tuple(getattr(self, f"{name}_{e}") for name in ("gate_up_a", "gate_up_b", "down_a", "down_b"))  # type: ignore[return-value]

    def expert_params(self, e: int) -> tuple[nn.Parameter, ...]:
        """What a site trains and sends for expert e: its LoRA factors, else its slices."""
        return self.lora_params(e) if self.lora_rank else self.base_params(e)

    def weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) expert e computes with: the slices, plus the scaled LoRA products."""
        gate_up, down = self.base_params(e)
        if not self.lora_rank:
            return gate_up, down
        gate_up_a, gate_up_b, down_a, down_b = self.lora_params(e)
        return gate_up + self.lora_scale * gate_up_b @ gate_up_a, down + self.lora_scale * down_b @ down_a

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
        rows, combine = dispatch_to_experts(x, expert_index, self.num_experts)
        outputs = []
        for e, rows_e in enumerate(rows):
            gate_up, down = self.weights(e)
            # an expert without tokens still runs on an empty batch so that its .grad is zeros, not None
            gate, up = (rows_e @ gate_up.T).chunk(2, dim=-1)
            outputs.append((F.silu(gate) * up) @ down.T)
        return combine(outputs)


class SparseMoEBlock(nn.Module):
    """A family's sparse MoE feed-forward block, batch-first: h [N, S, H] -> [N, S, H].

    Router logits = gate(h) [N, S, E]; p = softmax(logits); the top-k experts by p are chosen and
    weighted by their p (renormalised to sum 1 if ``renormalise``); plus, where the family has one,
    sigmoid(shared_expert_gate(h)) * shared_expert(h). The per-sample router losses of the last
    forward are kept for the model's aux loss (``last_losses``) and its counts in ``last_routing``.
    """

    def __init__(self, hidden: int, num_experts: int, top_k: int, intermediate: int, renormalise: bool,
                 shared_expert: nn.Module | None = None, shared_expert_gate: nn.Module | None = None,
                 lora_rank: int = 0, lora_alpha: float = 0.0) -> None:
        super().__init__()
        self.top_k = top_k
        self.renormalise = renormalise
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = SwiGLUExpertBank(num_experts, hidden, intermediate, lora_rank, lora_alpha)
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.last_routing: RoutingStats | None = None
        self.last_losses: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, s, d = h.shape
        logits = self.gate(h)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, top_index = probs.topk(self.top_k, dim=-1)
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        slots = h.unsqueeze(2).expand(n, s, self.top_k, d).reshape(n, s * self.top_k, d)
        expert_out = self.experts(slots, top_index.reshape(n, s * self.top_k)).view(n, s, self.top_k, d)
        y = (weights.to(h.dtype).unsqueeze(-1) * expert_out).sum(dim=2)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(h)) * self.shared_expert(h)
        balance, z_loss, self.last_routing = router_losses(logits, top_index)
        self.last_losses = (balance, z_loss)
        return y


class _Calls(nn.Module):
    """Stands in a decoder layer's ``mlp`` and calls a block that the wrapper owns, so that each
    parameter has one name (``moe_layers.{l}...``) in the state dict and in every reply."""

    def __init__(self, block: SparseMoEBlock) -> None:
        super().__init__()
        object.__setattr__(self, "block", block)  # not registered: no second name for its parameters

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block(h)


class HFMoECausalLM(nn.Module):
    """A transformers MoE causal LM with batch-first sparse blocks (module docstring).

    forward: tokens [N, T] (long) -> (next-token logits [N, T, V], weighted aux loss [N]).
    State-dict keys: ``hf.<the model's own key>`` for everything but the sparse blocks, and
    ``moe_layers.{l}.gate.weight``, ``moe_layers.{l}.experts.gate_up_{e}`` / ``down_{e}``,
    ``moe_layers.{l}.shared_expert.*`` for the l-th sparse block.

    ``lora_rank`` r > 0 (run config adapter=lora): the model is fine-tuned through LoRA adapters
    (scale lora_alpha / r) and its routers. peft puts them on every linear projection (attention,
    the shared expert, dense MLPs: ``...q_proj.lora_A.default.weight``), the expert bank on every
    expert (``moe_layers.{l}.experts.gate_up_a_{e}`` ...). Everything else is in
    ``frozen_parameters``: never trained, never sent. peft's own LoRA for the fused expert tensors
    (``target_parameters``) is not used: it stacks all experts' factors into one tensor and applies
    them through a parametrisation, so an expert's adapter could be neither frozen nor sent alone,
    nor given per-sample gradients.
    """

    LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def __init__(self, hf_model: nn.Module, seq_len: int, aux_loss_weight: float, z_loss_weight: float,
                 lora_rank: int = 0, lora_alpha: float = 16.0) -> None:
        super().__init__()
        name, family = family_of(hf_model.config)
        hf_config = hf_model.config
        if getattr(hf_config, "tie_word_embeddings", False):
            raise ValueError("tied input and output embeddings are not supported (one parameter in two Opacus-hooked modules)")
        self.hf = hf_model
        self.sparse_layer_index: list[int] = []
        blocks = []
        for index, layer in enumerate(hf_model.model.layers):
            stock = layer.mlp
            if not hasattr(getattr(stock, "experts", None), "gate_up_proj"):
                continue  # a dense layer (Qwen2/3-MoE mlp_only_layers, decoder_sparse_step)
            block = _batch_first_block(stock, family, hf_config, lora_rank, lora_alpha)
            layer.mlp = _Calls(block)
            self.sparse_layer_index.append(index)
            blocks.append(block)
        if not blocks:
            raise ValueError(f"{hf_config.model_type}: no sparse MoE layer found")
        self.moe_layers = nn.ModuleList(blocks)
        self.frozen_parameters: frozenset[str] = frozenset()
        if lora_rank:
            self._add_lora(lora_rank, lora_alpha)
        self.config = HFMoEConfig(
            d_model=hf_config.hidden_size, num_moe_layers=len(blocks), num_experts=getattr(hf_config, family.num_experts_attr),
            top_k=hf_config.num_experts_per_tok, expert_hidden=getattr(hf_config, family.expert_hidden_attr),
            router_noise=0.0, aux_loss_weight=aux_loss_weight, z_loss_weight=z_loss_weight, family=name, seq_len=seq_len,
        )

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # contiguous: Opacus' embedding norm sampler views the ids flat
        logits = self.hf(input_ids=tokens.contiguous(), use_cache=False).logits
        aux = logits.new_zeros(tokens.shape[0])
        for block in self.moe_layers:
            balance, z_loss = block.last_losses
            aux = aux + self.config.aux_loss_weight * balance + self.config.z_loss_weight * z_loss
        return logits, aux

    def routing_counts(self) -> torch.Tensor:
        """[num_moe_layers * E] token-slots routed to each global expert in the last forward."""
        return torch.cat([block.last_routing.expert_counts for block in self.moe_layers])

    def _add_lora(self, rank: int, alpha: float) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(self.LORA_TARGETS))
        inject_adapter_in_model(config, self.hf)
        for block in self.moe_layers:
            if block.shared_expert is not None:
                inject_adapter_in_model(config, block.shared_expert)
        trained = re.compile(r"\.lora_[AB]\.|^moe_layers\.\d+\.(gate\.weight$|experts\.(gate_up|down)_[ab]_\d+$)")
        self.frozen_parameters = frozenset(name for name, _ in self.named_parameters() if not trained.search(name))

    def _merged_state_dict(self) -> dict[str, torch.Tensor]:
        """state_dict with every peft LoRA layer merged into its base weight (plain key names)."""
        state = {}
        for key, value in self.state_dict().items():
            if ".lora_A." in key or ".lora_B." in key:
                continue
            if key.endswith(".base_layer.weight"):
                value = value + self.get_submodule(key.removesuffix(".base_layer.weight")).get_delta_weight("default")
            state[key.replace(".base_layer.", ".")] = value.detach()
        return state

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The state in the family's own keys and fused layout (what ``to_hf`` loads); LoRA merged."""
        merged = self._merged_state_dict()
        state = {key.removeprefix("hf."): value for key, value in merged.items() if key.startswith("hf.")}
        for index, (layer, block) in enumerate(zip(self.sparse_layer_index, self.moe_layers)):
            prefix = f"model.layers.{layer}.mlp."
            bank = block.experts
            for key, value in merged.items():
                own = key.removeprefix(f"moe_layers.{index}.")
                if own != key and not own.startswith("experts."):
                    state[prefix + own] = value
            weights = [bank.weights(e) for e in range(bank.num_experts)]
            state[prefix + "experts.gate_up_proj"] = torch.stack([gate_up.detach() for gate_up, _ in weights])
            state[prefix + "experts.down_proj"] = torch.stack([down.detach() for _, down in weights])
        return state

    def to_hf(self) -> nn.Module:
        """A stock model of the family holding this model's weights."""
        import transformers

        stock = getattr(transformers, FAMILIES[self.config.family].model_class)(self.hf.config)
        stock.load_state_dict(self.hf_state_dict(), strict=True)
        return stock.eval()

    def save_pretrained(self, directory: str | Path) -> None:
        """``save_pretrained`` of the stock model (experts in the family's per-expert files)."""
        self.to_hf().save_pretrained(directory)


def _batch_first_block(stock: nn.Module, family: Family, hf_config, lora_rank: int, lora_alpha: float) -> SparseMoEBlock:
    """A SparseMoEBlock with the stock block's weights; a shared expert is moved over as it is."""
    gate_up, down = stock.experts.gate_up_proj, stock.experts.down_proj  # [E, 2I, H], [E, H, I]
    num_experts, two_i, hidden = gate_up.shape
    renormalise = family.always_renormalise or bool(getattr(hf_config, "norm_topk_prob", False))
    block = SparseMoEBlock(hidden, num_experts, hf_config.num_experts_per_tok, two_i // 2, renormalise,
                           getattr(stock, "shared_expert", None), getattr(stock, "shared_expert_gate", None),
                           lora_rank, lora_alpha).to(gate_up.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(stock.gate.weight)
        for e in range(num_experts):
            block.experts.base_params(e)[0].copy_(gate_up[e])
            block.experts.base_params(e)[1].copy_(down[e])
    return block


def hf_config_for(family_name: str, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
                  num_experts: int, top_k: int, expert_hidden: int, seq_len: int):
    """A small model of the family sized by fedmoe's keys (every layer sparse, untied embeddings);
    the family's own defaults for the rest (rotary base, RMSNorm epsilon, SiLU)."""
    import transformers

    family = FAMILIES[family_name]
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_heads, num_experts_per_tok=top_k, max_position_embeddings=max(seq_len, 64),
        tie_word_embeddings=False, use_cache=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        **{family.num_experts_attr: num_experts, family.expert_hidden_attr: expert_hidden},
    )
    if family.shared_expert:
        kwargs.update(shared_expert_intermediate_size=expert_hidden, decoder_sparse_step=1, mlp_only_layers=[])
    if family_name == "qwen3-moe":
        kwargs.update(head_dim=d_model // num_heads, decoder_sparse_step=1, mlp_only_layers=[])
    return getattr(transformers, family.config_class)(**kwargs)


def build(family_name: str, hf_config, seq_len: int, aux_loss_weight: float, z_loss_weight: float,
          lora_rank: int = 0, lora_alpha: float = 16.0) -> HFMoECausalLM:
    """A freshly initialised model of the family (the caller seeds torch first)."""
    import transformers

    hf_model = getattr(transformers, FAMILIES[family_name].model_class)(hf_config)
    return HFMoECausalLM(hf_model.float(), seq_len, aux_loss_weight, z_loss_weight, lora_rank, lora_alpha)


def load(model_path: str | Path, seq_len: int, aux_loss_weight: float, z_loss_weight: float,
         lora_rank: int = 0, lora_alpha: float = 16.0) -> HFMoECausalLM:
    """A ``save_pretrained`` folder of a supported family, read from disk only (a hub name would be
    downloaded by transformers where the network allows; nothing in fedmoe's tests relies on that)."""
    import transformers

    local = Path(model_path).is_dir()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(model_path, local_files_only=local, dtype=torch.float32)
    return HFMoECausalLM(hf_model, seq_len, aux_loss_weight, z_loss_weight, lora_rank, lora_alpha)
