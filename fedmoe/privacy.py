"""Opacus glue: per-sample gradients and norms of the expert banks, the privacy ledger, noise planning.

Accounting is Opacus' RDP accountant (``opacus.accountants.RDPAccountant``). A site's ledger is
one accountant history for the whole run: entries (noise multiplier, sample rate, steps) for its
DP-SGD steps and one full-batch Gaussian entry (sigma_c, 1.0, 1) per release of its routing
counts. The history is restored before each round and saved after it, so epsilon accumulates
over rounds and restarts exactly as one accountant that saw every step.

Randomness: every draw the guarantee rests on (sampling masks, DP-SGD noise, count-release
noise) comes from ``dp_generator``, seeded from OS entropy inside the site each round, never from
the run config, site id or round, which the server knows (README, "Threat model").
"""

from __future__ import annotations

import json
import math
import secrets
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus.accountants import RDPAccountant
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from torch.utils.data import DataLoader, Dataset

from .models.hf_moe import SwiGLUExpertBank
from .models.moe import ExpertBank, PositionEmbedding
from .results import atomic_write_json

ACCOUNTANT = "rdp"
MAX_SIGMA = 1e4


# --- per-sample gradients of the expert banks ----------------------------------------------------
#
# Every expert tensor's per-sample gradient is an outer-product sum over the sample's token slots,
# sum_t g_t a_t^T (a: what the tensor multiplies, g: the gradient of what it produces). Each bank
# gives, per expert, one factor pair (a [N,T,p], g [N,T,q]) per tensor of ``expert_params(e)``;
# the grad sampler forms the sums, the norm sampler (ghost clipping) only their norms.

def _gelu_expert_factors(bank: ExpertBank, x: torch.Tensor, index: torch.Tensor, backprops: torch.Tensor, e: int):
    """(a, g) for w_in [d,h], b_in [h], w_out [h,d], b_out [d] of expert e; zero on token slots
    not routed to e, the hidden layer computed on the routed slots only, as the forward did."""
    w_in, b_in, w_out, _ = bank.expert_params(e)
    routed = index == e
    g_out = backprops * routed.unsqueeze(-1).to(backprops.dtype)
    pre = x[routed] @ w_in + b_in
    hidden = x.new_zeros(*index.shape, w_in.shape[1])
    hidden[routed] = torch.nn.functional.gelu(pre)
    g_pre = torch.zeros_like(hidden)
    g_pre[routed] = torch.ops.aten.gelu_backward(backprops[routed] @ w_out.T, pre)
    ones = x.new_ones(*index.shape, 1)  # a bias multiplies 1
    return [(g_pre, x), (ones, g_pre), (g_out, hidden), (ones, g_out)]


def _swiglu_expert_factors(bank: SwiGLUExpertBank, x: torch.Tensor, index: torch.Tensor, backprops: torch.Tensor, e: int):
    """(a, g) for gate_up [2I,H] and down [H,I] of expert e, or with LoRA (W = W0 + s B A on input a
    with output gradient g: dA = sum (s g B) a^T, dB = sum g (s A a)^T) for its four factors; zero
    on token slots not routed to e."""
    gate_up, down = bank.weights(e)
    routed = index == e
    g_out = backprops * routed.unsqueeze(-1).to(backprops.dtype)
    gate, up = (x[routed] @ gate_up.T).chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    hidden = x.new_zeros(*index.shape, bank.intermediate)
    hidden[routed] = silu * up
    g_hidden = backprops[routed] @ down
    g_pre = x.new_zeros(*index.shape, 2 * bank.intermediate)  # gradient of the gate|up pre-activation
    g_pre[routed] = torch.cat([g_hidden * up * sig * (1 + gate * (1 - sig)), g_hidden * silu], dim=-1)
    if not bank.lora_rank:
        return [(x, g_pre), (hidden, g_out)]
    s = bank.lora_scale
    gate_up_a, gate_up_b, down_a, down_b = bank.lora_params(e)
    return [(x, s * g_pre @ gate_up_b), (s * x @ gate_up_a.T, g_pre),
            (hidden, s * g_out @ down_b), (s * hidden @ down_a.T, g_out)]


EXPERT_FACTORS = {ExpertBank: _gelu_expert_factors, SwiGLUExpertBank: _swiglu_expert_factors}


def _per_trainable_parameter(bank, activations: list[torch.Tensor], backprops: torch.Tensor, outer):
    """{param: outer(a, g)} for every trainable tensor of the bank's experts."""
    x, index = activations[0].to(backprops.dtype), activations[1]
    factors = EXPERT_FACTORS[type(bank)]
    ret = {}
    for e in range(bank.num_experts):
        params = bank.expert_params(e)
        if any(p.requires_grad for p in params):
            pairs = factors(bank, x, index, backprops, e)
            ret.update({p: outer(a, g) for p, (a, g) in zip(params, pairs, strict=True) if p.requires_grad})
    return ret


def _outer_sum_norm(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """|| sum_t a_t g_t^T ||_F per sample for a [N,T,p], g [N,T,q], without forming [N,p,q] when
    the Gram form sum_{t,s} (a_t.a_s)(g_t.g_s) is cheaper."""
    n, t, p = a.shape
    q = g.shape[-1]
    if t * t * (p + q) < t * p * q:
        sq = (torch.einsum("ntp,nsp->nts", a, a) * torch.einsum("ntq,nsq->nts", g, g)).sum(dim=(1, 2))
    else:
        sq = torch.einsum("ntp,ntq->npq", a, g).pow(2).sum(dim=(1, 2))
    return sq.clamp_min(0).sqrt()


@register_grad_sampler([ExpertBank, SwiGLUExpertBank])
def compute_expert_bank_grad_sample(bank, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample grads: x [N,T,d], index [N,T], backprops [N,T,d] -> {param: [N, *param.shape]}."""
    sums = _per_trainable_parameter(bank, activations, backprops, lambda a, g: torch.einsum("ntq,ntp->nqp", g, a))
    return {p: s.reshape(len(s), *p.shape) for p, s in sums.items()}


@register_norm_sampler([ExpertBank, SwiGLUExpertBank])
def compute_expert_bank_norm_sample(bank, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample grad norms (ghost clipping): x [N,T,d], index [N,T], backprops [N,T,d] -> {param: [N]}."""
    return _per_trainable_parameter(bank, activations, backprops, _outer_sum_norm)


@register_grad_sampler(PositionEmbedding)
def compute_position_grad_sample(
    module: PositionEmbedding, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample grads: backprops [N,S,d] -> {weight: [N,S,d]} (the output gradient itself)."""
    return {module.weight: backprops} if module.weight.requires_grad else {}


@register_norm_sampler(PositionEmbedding)
def compute_position_norm_sample(
    module: PositionEmbedding, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample grad norms: backprops [N,S,d] -> {weight: [N]}."""
    return {module.weight: backprops.flatten(1).norm(dim=1)} if module.weight.requires_grad else {}


# --- accounting ----------------------------------------------------------------------------------

HistoryEntry = tuple[float, float, int]  # (noise multiplier, sample rate, steps), as RDPAccountant


def epsilon_of(history: list[HistoryEntry], delta: float) -> float:
    """Epsilon of a composed history under Opacus' RDP accountant (0 for an empty history)."""
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    accountant = RDPAccountant()
    accountant.history = [tuple(h) for h in history]
    return float(accountant.get_epsilon(delta=delta))


def plan_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int,
    count_releases: int = 0, count_noise_multiplier: float = 0.0, tolerance: float = 0.01,
) -> float:
    """Smallest DP-SGD noise multiplier (to ``tolerance`` in epsilon) such that ``steps`` steps at
    ``sample_rate`` plus ``count_releases`` full-batch Gaussian releases stay within the target."""
    if math.isinf(target_epsilon):
        return 0.0

    def eps(sigma: float) -> float:
        history = [(sigma, sample_rate, steps)]
        if count_releases:
            history.append((count_noise_multiplier, 1.0, count_releases))
        return epsilon_of(history, delta)

    floor = epsilon_of([(count_noise_multiplier, 1.0, count_releases)], delta) if count_releases else 0.0
    if floor >= target_epsilon:
        raise ValueError(
            f"target-epsilon {target_epsilon} is spent by the {count_releases} count releases alone "
            f"(epsilon {floor:.2f}); raise count-noise-multiplier or the target"
        )
    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, 2 * high
        if high > MAX_SIGMA:
            raise ValueError(f"target-epsilon {target_epsilon} is unreachable for {steps} steps")
    while eps(high) < target_epsilon - tolerance and high - low > 1e-4:
        mid = (low + high) / 2
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


def count_sensitivity(tokens_per_sample: int, top_k: int, num_layers: int) -> float:
    """L2 sensitivity of the routed token counts to one sample: each of its tokens adds 1 to k
    distinct experts per layer, so its count vector has entries <= tokens and norm <= tokens*sqrt(k*L)."""
    return tokens_per_sample * math.sqrt(top_k * num_layers)


def release_counts(counts: np.ndarray, noise_multiplier: float, sensitivity: float, generator: torch.Generator) -> np.ndarray:
    """Gaussian mechanism on routing counts; negative results are clamped to 0 (post-processing)."""
    noise = torch.randn(len(counts), generator=generator, dtype=torch.float64).numpy()
    return np.clip(counts + noise * noise_multiplier * sensitivity, 0.0, None)


def dp_generator(reproducible_seed: int | None = None) -> torch.Generator:
    """The source of every draw a site's DP guarantee rests on in one round: Poisson sampling
    masks, DP-SGD noise, count-release noise.

    By default it is seeded with 63 bits from the OS entropy pool (``secrets``) that never leave
    this function: the server knows the run config, the seed, the site and the round, and must
    not be able to regenerate the noise from them and subtract it. ``reproducible_seed`` (run
    config ``dp-reproducible-noise=true``) seeds it from the config instead, for debugging only:
    the guarantee then does not hold against anyone who knows the config.
    """
    seed = secrets.randbits(63) if reproducible_seed is None else reproducible_seed
    return torch.Generator().manual_seed(seed)


RoundRecord = dict[str, Any]  # {"round": r, "charged": [HistoryEntry, ...], "epsilon": after the round}


@dataclass
class PrivacyLedger:
    """One site's privacy state for a whole run; everything needed to recompute its epsilon.

    ``history`` is what the RDP accountant composes; ``rounds`` says what each round charged
    (its count release, then its DP-SGD steps) and the epsilon after it, so an auditor can check
    that the history is exactly the rounds' charges (fedmoe.audit). ``num_examples`` fixes the
    sample rate 1 / ceil(n / batch size); like every DP-SGD analysis that publishes q, the ledger
    treats the site's dataset size as public. ``reproducible_noise`` is sticky: once one round's
    randomness came from the config, the run's guarantee is void against whoever knows it.
    """

    site: int
    target_epsilon: float
    delta: float
    noise_multiplier: float
    count_noise_multiplier: float
    sample_rate: float
    num_examples: int = 0
    reproducible_noise: bool = False
    accountant: str = ACCOUNTANT
    history: list[HistoryEntry] = field(default_factory=list)
    rounds: list[RoundRecord] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(s for _, _, s in self.history)

    def epsilon(self, extra: list[HistoryEntry] | None = None) -> float:
        return epsilon_of(self.history + list(extra or []), self.delta)

    def charge(self, entries: list[HistoryEntry]) -> None:
        """Append entries, merging with the last one when the mechanism is identical (as Opacus does)."""
        self.history = merge_history(self.history, entries)

    def close_round(self, server_round: int, charged: list[HistoryEntry]) -> None:
        """Record what ``server_round`` charged (already in the history) and the epsilon after it."""
        self.rounds.append({"round": int(server_round), "charged": [list(e) for e in charged],
                            "epsilon": _json_float(self.epsilon())})

    def to_json(self) -> str:
        d = asdict(self)
        d["history"] = [list(h) for h in self.history]
        d["target_epsilon"] = _json_float(self.target_epsilon)
        d["epsilon"] = _json_float(self.epsilon())
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "PrivacyLedger":
        d = json.loads(text)
        d.pop("epsilon", None)
        d["history"] = [(float(s), float(q), int(n)) for s, q, n in d["history"]]
        d["target_epsilon"] = float(d["target_epsilon"])
        return cls(**d)

    def save(self, path: Path) -> None:
        atomic_write_json(path, json.loads(self.to_json()))

    @classmethod
    def load(cls, path: Path) -> "PrivacyLedger | None":
        return cls.from_json(path.read_text()) if path.exists() else None


def merge_history(history: list[HistoryEntry], entries: list[HistoryEntry]) -> list[HistoryEntry]:
    """``history`` followed by ``entries``, a new entry merged into the last one when its
    (noise multiplier, sample rate) is the same, as Opacus' accountant records repeated steps."""
    merged = [tuple(h) for h in history]
    for sigma, rate, steps in entries:
        if steps <= 0:
            continue
        if merged and merged[-1][:2] == (sigma, rate):
            merged[-1] = (sigma, rate, merged[-1][2] + steps)
        else:
            merged.append((sigma, rate, steps))
    return merged


def _json_float(x: float) -> float | str:
    return "inf" if math.isinf(x) else x


# --- one round of DP-SGD ---------------------------------------------------------------------------

def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches per epoch; Opacus' Poisson loader keeps this length with sample rate 1/length."""
    return max(1, math.ceil(num_examples / batch_size))


def train_private(
    model: torch.nn.Module, dataset: Dataset, batch_size: int, optimizer: torch.optim.Optimizer,
    epochs: int, ledger: PrivacyLedger, max_grad_norm: float, mode: str, generator: torch.Generator,
    max_physical_batch_size: int = 0,
) -> float:
    """DP-SGD on ``model``'s trainable parameters; the accountant starts from the ledger's history
    and the ledger takes the updated history. Returns the mean loss (which stays at the site).

    Poisson sampling at rate 1 / ceil(len(dataset) / batch_size), as the accountant assumes;
    ``batch_size`` is the expected logical batch, which Opacus' BatchMemoryManager cuts into
    physical batches of at most ``max_physical_batch_size`` examples (0: no limit) whose clipped
    gradients it sums before one noisy step, so memory does not limit the batch size.
    ``generator`` (``dp_generator``) draws both the sampling masks (Opacus' Poisson loader takes
    the generator of the loader it wraps) and the noise, which is drawn as Opacus' secure mode
    draws it (a sum of four Gaussians) to blunt floating-point attacks on Gaussian sampling.
    """
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    from .training import MoELoss, train_epochs

    model.train()
    loader = DataLoader(dataset, batch_size=batch_size, generator=generator)
    with warnings.catch_warnings():
        # "Secure RNG turned off" speaks of Opacus' own CSPRNG (torchcsprng); our noise comes from
        # the site's secret generator, drawn in secure mode below, and the README says so
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=ACCOUNTANT)
    engine.accountant.history = list(ledger.history)
    wrapped = engine.make_private(
        module=model, optimizer=optimizer, criterion=MoELoss(), data_loader=loader,
        noise_multiplier=ledger.noise_multiplier, max_grad_norm=max_grad_norm,
        grad_sample_mode=mode, poisson_sampling=True, noise_generator=generator,
    )
    if mode == "ghost":
        private_model, private_optimizer, criterion, private_loader = wrapped
    else:
        (private_model, private_optimizer, private_loader), criterion = wrapped, MoELoss()
    # PrivacyEngine(secure_mode=True) would also need torchcsprng (not installable here); the
    # optimizer's own flag selects only the hardened noise sampling
    private_optimizer.secure_mode = True
    try:
        with warnings.catch_warnings():
            # torch's note that a full backward hook fires on module outputs when the inputs need
            # no gradient: ghost clipping's second backward pass does exactly that, by design
            warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
            if max_physical_batch_size > 0:
                with BatchMemoryManager(data_loader=private_loader, max_physical_batch_size=max_physical_batch_size,
                                        optimizer=private_optimizer) as physical_loader:
                    loss = train_epochs(private_model, physical_loader, private_optimizer, epochs, criterion)
            else:
                loss = train_epochs(private_model, private_loader, private_optimizer, epochs, criterion)
    finally:
        private_model._close()  # detach Opacus' hooks; ``model`` holds the trained weights
    ledger.history = [tuple(h) for h in engine.accountant.history]
    return loss
