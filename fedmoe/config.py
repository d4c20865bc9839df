"""Run configuration: every key of ``[tool.flwr.app.config]``, its type, default and check.

Flower hands the ServerApp and every ClientApp the same flat run config (pyproject defaults
overridden by ``flwr run -c "key=value"``). ``RunConfig.from_run_config`` turns it into a typed,
validated object and fails before any training with a message naming the offending key.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .federation.aggregation import RobustRules
from .federation.compression import METHODS as COMPRESSION_METHODS
from .federation.server_optimizers import SERVER_OPTIMIZERS
from .models.hf_families import FAMILIES, model_path_problems

if TYPE_CHECKING:  # torch stays unimported until a model is built: a bad config fails in well under a second
    from .models.moe import MoEConfig
    from .federation.server_optimizers import ServerOptimizer


class ConfigError(ValueError):
    """A run-config key is unknown or has an invalid value."""


def _task_name(value: str) -> str | None:
    if value in ("fmnist", "images", "charlm", "hf-moe") or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
        return None
    return "must be fmnist, images, charlm, hf-moe or module:Class (a fedmoe.data.tasks.Task)"


def _choice_int(*options: int):
    def check(value: int) -> str | None:
        return None if value in options else f"must be one of {', '.join(map(str, options))}"

    return check


def _choice(*options: str):
    def check(value: str) -> str | None:
        return None if value in options else f"must be one of {list(options)}"
    return check


def _at_least(low: float):
    def check(value: float) -> str | None:
        return None if value >= low else f"must be >= {low}"
    return check


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


def _fraction(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be in [0, 1]"


def _in_range(low: float, high: float):
    def check(value: float) -> str | None:
        return None if low <= value <= high else f"must be in [{low}, {high}]"
    return check


def _language_list(value: str) -> str | None:
    from .data.text import LANGUAGE_PACKAGES

    unknown = [lang for lang in value.split(",") if lang not in LANGUAGE_PACKAGES]
    return f"unknown languages {unknown}; known: {','.join(LANGUAGE_PACKAGES)}" if unknown or not value else None


def _site_list(value: str) -> str | None:
    try:
        sites = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        return "must be comma-separated partition ids such as '0,2'"
    return None if all(s >= 0 for s in sites) else "partition ids must be >= 0"


def _personal_parts(value: str) -> str | None:
    from .federation.personalization import parse_parts

    try:
        parse_parts(value)
    except ValueError as exc:
        return str(exc)
    return None


def _open_fraction(value: float) -> str | None:
    return None if 0.0 < value < 1.0 else "must be in (0, 1)"


def _key(default: Any, check=None, help: str = "", allow_inf: bool = False):
    return field(default=default, metadata={"check": check, "help": help, "allow_inf": allow_inf})


@dataclass(frozen=True)
class RunConfig:
    # Federation
    num_server_rounds: int = _key(10, _at_least(1), "federated rounds")
    fraction_train: float = _key(1.0, _fraction, "share of connected sites sampled per round")
    fraction_evaluate: float = _key(1.0, _fraction, "share of sites asked to evaluate")
    min_nodes: int = _key(2, _at_least(1), "sites that must be connected before a round starts")
    round_timeout: float = _key(600.0, _positive, "seconds the server waits for replies in a round; sites that miss it are logged as lost")
    strategy: str = _key("expert-matched", _choice("expert-matched", "fedavg"),
                         "expert-matched: sites train and send their active experts; fedavg: Flower's FedAvg, every expert trained and sent")
    sparse_downlink: bool = _key(True, None, "send each site only the tensors changed since the model version it holds")
    derive_initial_model: bool = _key(False, None, "with sparse-downlink: sites rebuild the initial global model from the run "
                                      "config (its seed) and check its sha256 instead of receiving it in round 1 (a resumed run sends it)")
    # Robust aggregation (expert-matched; fedmoe.federation.aggregation.RobustRules) and reply validation
    aggregation: str = _key("mean", _choice("mean", "trimmed-mean", "median"), "how each expert (and the shared tensors) combines the sites' updates")
    trim_fraction: float = _key(0.2, _in_range(0.0, 0.49), "aggregation=trimmed-mean: share of largest and of smallest values dropped per coordinate")
    update_norm_bound: float = _key(0.0, _at_least(0.0), "clip each site's update to each expert (and to the shared tensors) to this L2 norm (0: off)")
    outlier_mad: float = _key(0.0, _at_least(0.0), "drop a site's update to an expert whose norm's modified z-score exceeds this (0: off; 3.5 is usual)")
    outlier_min_cosine: float = _key(-1.0, _in_range(-1.0, 1.0), "drop a site's update to an expert whose cosine to the median update is below this (-1: off)")
    outlier_min_contributors: int = _key(3, _at_least(2), "outlier tests run on experts with at least this many updates")
    max_update_norm: float = _key(0.0, _at_least(0.0), "reject a whole reply whose update (all its tensors) has a larger L2 norm (0: off)")
    update_compression: str = _key("none", _choice(*COMPRESSION_METHODS), "sites send their update compressed "
                                   "(fedmoe.federation.compression: fp16, or int8 or int4 with a scale per row), with error feedback")
    downlink_compression: str = _key("none", _choice(*COMPRESSION_METHODS), "the server sends each changed tensor as a "
                                     "compressed step of the model the sites hold (fedmoe.federation.downlink; needs sparse-downlink)")
    # Server optimizer on the aggregated pseudo-gradient (fedmoe.federation.server_optimizers)
    server_optimizer: str = _key("none", _choice(*SERVER_OPTIMIZERS), "none: the average is the new model; fedavgm, fedadam, fedyogi: Reddi et al. 2021, per tensor")
    server_learning_rate: float = _key(1.0, _positive, "server step size η")
    server_momentum: float = _key(0.9, _in_range(0.0, 0.999), "β1: momentum (fedavgm) or first-moment decay (fedadam, fedyogi)")
    server_beta2: float = _key(0.99, _in_range(0.0, 0.9999), "β2: second-moment decay (fedadam, fedyogi)")
    server_tau: float = _key(1e-3, _positive, "τ: adaptivity floor of fedadam and fedyogi")
    site_registry: str = _key("", None, "JSON file {site: node id}: only that node may speak for that site "
                              "(fedmoe.federation.site_binding); empty: a site is bound to the first node that claims it")
    # Hostile sites, for experiments (fedmoe.attacks)
    attack: str = _key("none", _choice("none", "scale", "sign-flip", "backdoor"), "what the sites in attack-sites do instead of honest training")
    attack_sites: str = _key("", _site_list, "comma-separated partition ids of the attacking sites")
    attack_scale: float = _key(10.0, _positive, "factor on an attacker's update (scale, backdoor) or its negation (sign-flip)")
    attack_target_label: int = _key(0, _in_range(0, 9), "label a backdoor trigger should produce")
    attack_expert: int = _key(-1, _at_least(-1), "global expert id the scale attack targets (-1: the attacker's least-used expert outside its active set)")
    # Personal parts each site keeps and never sends (fedmoe.federation.personalization)
    personalize: str = _key("none", _personal_parts, "none, or parts each site keeps for itself: head, router, expert (comma-separated)")
    personal_model: str = _key("none", _choice("none", "ditto"), "ditto: each site also trains a whole model of its own, "
                               "never sent, pulled toward the global model (Li et al. 2021; fedmoe.federation.personalization)")
    ditto_lambda: float = _key(0.1, _at_least(0.0), "personal-model=ditto: weight of the pull (lambda/2) ||v - w||^2 "
                               "of the personal model v toward the global model w the site received (0: local training alone)")
    personal_epochs: int = _key(1, _at_least(1), "personal-model=ditto: epochs a round over the site's data")
    personal_batch_size: int = _key(64, _at_least(1), "personal-model=ditto: batch size of the personal model's training")
    personal_learning_rate: float = _key(0.002, _positive, "personal-model=ditto: step size in round 1, "
                                         "decayed per round by learning-rate-decay as the site's")
    # Local training
    local_epochs: int = _key(1, _at_least(1), "epochs over the site's data per round")
    batch_size: int = _key(1024, _at_least(1), "expected local batch size (under DP the logical batch of each noisy step)")
    max_physical_batch_size: int = _key(512, _at_least(0), "under DP, at most this many examples per forward/backward pass "
                                        "(Opacus' BatchMemoryManager; 0: the whole logical batch at once)")
    learning_rate: float = _key(0.04, _positive, "local optimiser step size")
    learning_rate_decay: float = _key(0.85, _fraction, "client step size in round r is learning-rate * decay^(r-1)")
    optimizer: str = _key("adam", _choice("adam", "adam-bc", "sgd"), "local optimiser (adam-bc: Adam discounting the DP "
                          "noise's variance in its second moment, fedmoe.training.NoiseAwareAdam; Adam without DP)")
    adam_bc_floor: float = _key(1.0, _positive, "optimizer=adam-bc: lower bound of the corrected second moment, "
                                "in units of the noise's variance per coordinate")
    ema_decay: float = _key(0.0, _in_range(0.0, 0.9999), "a site sends the exponential moving average of its local "
                            "iterates with this decay (fedmoe.training.iterate_average; 0: the last iterate)")
    seed: int = _key(0, _at_least(0), "seed for model init, data split and training")
    # Workload (fedmoe.data.tasks)
    task: str = _key("fmnist", _task_name, "fmnist: Fashion-MNIST classifier; images: your own images at data-path; "
                     "charlm: byte-level MoE language model, one language per site; hf-moe: a Hugging Face transformers MoE "
                     "language model on the same text; module:Class: your own fedmoe.data.tasks.Task")
    # Data
    data_source: str = _key("auto", _choice("auto", "debian", "hub"), "where Fashion-MNIST comes from")
    partitioning: str = _key("domain", _choice("iid", "dirichlet", "domain", "column"),
                             "how sites split the data (column: site-column names each example's site, task=images)")
    dirichlet_alpha: float = _key(0.5, _positive, "concentration for partitioning=dirichlet")
    domains_per_site: int = _key(1, _at_least(1), "partitioning=domain: coarse domains per site (task=images: whole classes per site)")
    site_test_fraction: float = _key(0.2, _open_fraction, "share of each site's data kept as its test split")
    max_examples_per_site: int = _key(0, _at_least(0), "cap on each site's partition before its train/test split (0: no cap)")
    data_path: str = _key("", None, "task=images: an ImageFolder tree or a saved HF dataset (fedmoe.data.own_images)")
    image_size: int = _key(28, _at_least(1), "task=images: images are resized to image-size x image-size")
    image_channels: int = _key(1, _choice_int(1, 3), "task=images: 1 (grayscale) or 3 (RGB)")
    image_column: str = _key("image", None, "task=images, saved HF dataset: the image column")
    label_column: str = _key("label", None, "task=images, saved HF dataset: the integer label column")
    site_column: str = _key("", None, "task=images, partitioning=column: the column naming each example's site")
    languages: str = _key("en,de,it,es,ru,pl,cs,pt", _language_list, "charlm: Debian fortunes languages, site i gets the i-th (cycling)")
    languages_per_site: int = _key(1, _at_least(1), "charlm: languages each site holds")
    text_dir: str = _key("", None, "charlm: your own corpus instead of fortunes, one sub-folder of .txt files per site")
    seq_len: int = _key(64, _at_least(2), "charlm, hf-moe: bytes per training sequence")
    # Model
    d_model: int = _key(64, _at_least(1), "token width")
    head: str = _key("linear", _choice("linear", "fixed-etf"), "fmnist classifier head: linear (learned) or fixed-etf (fixed simplex-ETF class vectors, never trained or sent)")
    features: str = _key("scattering", _choice("pixels", "scattering"),
                         "fmnist, images: what the classifier's tokens are cut from: the pixels, or their scattering "
                         "features (fixed, no parameters: fedmoe.data.scattering)")
    patch_size: int = _key(0, _at_least(0), "side of a token's square on the input grid (28 x 28 pixels, or the 8 x 8 "
                           "scattering grid); 0: a 4 x 4 grid of tokens (7 on pixels, 2 on scattering features)")
    num_moe_layers: int = _key(1, _at_least(1), "MoE blocks (charlm: transformer layers, each attention + MoE)")
    num_heads: int = _key(4, _at_least(1), "charlm, hf-moe: attention heads")
    hf_model: str = _key("mixtral", _choice(*FAMILIES), "hf-moe: the transformers MoE family of a model built from "
                         "fedmoe's size keys (d-model, num-moe-layers, num-heads, num-experts, top-k, expert-hidden)")
    model_path: str = _key("", None, "hf-moe: a save_pretrained folder of a supported family to start from instead "
                           "(its config.json must agree with num-experts, top-k and num-moe-layers)")
    adapter: str = _key("none", _choice("none", "lora"), "hf-moe: lora trains LoRA adapters (peft on every linear "
                        "projection, one per expert in the expert bank) and the routers instead of the whole model")
    lora_rank: int = _key(8, _at_least(1), "adapter=lora: rank r of every adapter")
    lora_alpha: float = _key(16.0, _positive, "adapter=lora: adapters are scaled by lora-alpha / lora-rank")
    num_experts: int = _key(8, _at_least(1), "experts per MoE layer")
    top_k: int = _key(2, _at_least(1), "experts per token")
    expert_hidden: int = _key(128, _at_least(1), "hidden width of each expert MLP")
    router_noise: float = _key(1.0, _at_least(0.0), "std of router logit noise while training")
    aux_loss_weight: float = _key(0.01, _at_least(0.0), "load-balancing loss weight")
    z_loss_weight: float = _key(0.001, _at_least(0.0), "router z-loss weight")
    # Active-set selection
    active_top_m: int = _key(2, _at_least(0), "a site trains at most its m most used experts per layer (0: no cap)")
    active_min_share: float = _key(0.05, _fraction, "an expert needs this share of a site's routed tokens to be trained")
    # Differential privacy (sample-level DP-SGD per site, Opacus, RDP accounting)
    dp: bool = _key(True, None, "train with DP-SGD and release routing counts through a Gaussian mechanism")
    target_epsilon: float = _key(8.0, _positive, "each site's epsilon budget for the whole run (inf: clip only, no noise)", allow_inf=True)
    target_delta: float = _key(1e-5, _open_fraction, "delta of the (epsilon, delta) guarantee")
    max_grad_norm: float = _key(1.0, _positive, "per-sample gradient clipping bound")
    noise_multiplier: float = _key(0.0, _at_least(0.0), "DP-SGD noise multiplier; 0: derived once from target-epsilon and the planned steps")
    accountant: str = _key("rdp", _choice("rdp", "prv"),
                           "Opacus accountant of the sites' ledgers: rdp, or prv (a tighter epsilon, so about 5-8% less noise for a target)")
    count_noise_multiplier: float = _key(60.0, _positive, "Gaussian noise on released routing counts, in units of their sensitivity")
    dp_mode: str = _key("bookkeeping", _choice("bookkeeping", "ghost", "hooks"),
                        "per-sample clipping: bookkeeping (one backward pass), Opacus ghost clipping (two) or hooks (per-sample grads)")
    dp_reproducible_noise: bool = _key(False, None, "debugging only: DP noise and sampling seeded from seed, site and round; "
                                       "the guarantee then does not hold against anyone who knows the config")
    dp_site_evaluation: bool = _key(False, None, "under DP, sites report accuracy and loss on their own test split "
                                    "(outside the guarantee: those metrics are charged to nothing)")
    # Output
    results_dir: str = _key("results", None, "folder for run folders (relative to the ServerApp's working directory)")
    run_name: str = _key("", None, "run folder name; empty: timestamp and run id")
    resume: str = _key("", None, "continue the run in this folder of results-dir ('latest' for the newest) from its checkpoint")

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("\n".join(problems))

    def problems(self) -> list[str]:
        """One line per bad value or violated cross-key constraint, each naming its key."""
        problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not (math.isfinite(value) or (f.metadata["allow_inf"] and value == math.inf)):
                problems.append(f"run config '{config_key(f.name)}': must be finite, got {value}")
                continue
            check = f.metadata.get("check")
            problem = check(value) if check else None
            if problem:
                problems.append(f"run config '{config_key(f.name)}': {problem}, got {value!r}")
        if self.top_k > self.num_experts:
            problems.append(f"run config 'top-k': must be <= num-experts ({self.num_experts}), got {self.top_k}")
        if self.active_top_m > self.num_experts:
            problems.append(f"run config 'active-top-m': must be <= num-experts ({self.num_experts}), got {self.active_top_m}")
        if self.task in ("charlm", "hf-moe") and self.num_heads > 0 and self.d_model % self.num_heads:
            problems.append(f"run config 'num-heads': must divide d-model ({self.d_model}), got {self.num_heads}")
        if self.attack_expert >= self.num_moe_layers * self.num_experts:
            problems.append(f"run config 'attack-expert': must be < num-moe-layers x num-experts "
                            f"({self.num_moe_layers * self.num_experts}), got {self.attack_expert}")
        if self.adapter != "none" and self.task != "hf-moe":
            problems.append(f"run config 'adapter': adapters are for task=hf-moe, got adapter={self.adapter!r} with task={self.task!r}")
        if _personal_parts(self.personalize) is None and self.personal_expert and self.task not in ("fmnist", "images", "charlm"):
            problems.append(f"run config 'personalize': a personal expert is built into fedmoe's own models "
                            f"(task fmnist, images or charlm), not task={self.task!r}")
        if self.personal_model != "none" and _personal_parts(self.personalize) is None and self.personal_parts:
            problems.append(f"run config 'personal-model': a whole personal model replaces personal parts; "
                            f"give personalize='none' with personal-model={self.personal_model!r}, got personalize={self.personalize!r}")
        if self.task in ("charlm", "hf-moe") and self.attack == "backdoor":
            problems.append("run config 'attack': the backdoor trigger is an image patch (task=fmnist), got 'backdoor'")
        grid, _, _ = self.input_grid()
        if self.patch_size > 0 and grid % self.patch_size:
            problems.append(f"run config 'patch-size': must divide the input grid ({grid}: image-size with "
                            f"features={self.features!r}), got {self.patch_size}")
        if not self.patch_size and grid % 4:
            problems.append(f"run config 'patch-size': 0 cuts the input grid ({grid}) into 4 x 4 tokens; "
                            f"give a patch size that divides it")
        if self.attack == "backdoor" and self.features != "pixels":
            problems.append("run config 'features': the backdoor trigger is stamped on pixels, "
                            f"attack=backdoor needs features='pixels', got {self.features!r}")
        if self.task == "fmnist" and (self.image_size, self.image_channels) != (28, 1):
            problems.append(f"run config 'image-size' / 'image-channels': Fashion-MNIST images are 28 x 28 x 1, "
                            f"got {self.image_size} x {self.image_size} x {self.image_channels}")
        if self.task == "images" and not self.data_path:
            problems.append("run config 'data-path': task=images needs a folder of images or a saved HF dataset")
        if self.partitioning == "column" and not (self.task == "images" and self.site_column):
            problems.append("run config 'partitioning': column needs task=images and site-column naming each example's site")
        if self.strategy == "fedavg" and not self.robust_rules().plain:
            problems.append("run config 'aggregation' / 'update-norm-bound' / 'outlier-*': robust rules need "
                            "strategy=expert-matched (fedavg is Flower's FedAvg as is)")
        if self.derive_initial_model and not self.sparse_downlink:
            problems.append("run config 'derive-initial-model': sites skip the initial model only under sparse-downlink=true")
        if self.downlink_compression != "none" and not self.sparse_downlink:
            problems.append("run config 'downlink-compression': compressed steps go between model versions, which "
                            "needs sparse-downlink=true")
        if self.update_compression != "none" and self.attack != "none":
            problems.append("run config 'update-compression': the attack experiments send uncompressed tensors, "
                            f"got update-compression={self.update_compression!r} with attack={self.attack!r}")
        if self.domains_per_site > 3 and self.task == "fmnist":
            problems.append(f"run config 'domains-per-site': there are 3 domains, got {self.domains_per_site}")
        return problems

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Typed config from Flower's flat run config. Unknown keys, bad types, bad values and
        violated cross-key constraints fail together: one ConfigError line per problem."""
        fields = {config_key(f.name): f for f in dataclasses.fields(cls)}
        values, problems = {}, []
        for key, raw in run_config.items():
            if key not in fields:
                problems.append(unknown_key_message(key, fields))
                continue
            f = fields[key]
            try:
                values[f.name] = _coerce(key, raw, type(f.default))
            except ConfigError as exc:
                problems.append(str(exc))
        try:
            config = cls(**values)
        except ConfigError as exc:
            problems.extend(str(exc).splitlines())
        if problems:
            raise ConfigError("\n".join(problems))
        return config

    def round_learning_rate(self, server_round: int, base: float | None = None) -> float:
        """The round's step size: ``base`` (default learning-rate) decayed by learning-rate-decay a round."""
        return (self.learning_rate if base is None else base) * self.learning_rate_decay ** (server_round - 1)

    def as_run_config(self) -> dict[str, Any]:
        return {config_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def robust_rules(self) -> RobustRules:
        return RobustRules(
            rule=self.aggregation, trim_fraction=self.trim_fraction, update_norm_bound=self.update_norm_bound,
            outlier_mad=self.outlier_mad, outlier_min_cosine=self.outlier_min_cosine,
            min_contributors=self.outlier_min_contributors,
        )

    def server_optimizer_state(self) -> ServerOptimizer | None:
        from .federation.server_optimizers import ServerOptimizer

        if self.server_optimizer == "none":
            return None
        return ServerOptimizer(self.server_optimizer, self.server_learning_rate, self.server_momentum,
                               self.server_beta2, self.server_tau)

    def input_grid(self) -> tuple[int, int, int]:
        """(side, channels, patch side) of what the image classifier reads: the image, or its
        scattering features (fedmoe.data.scattering); patch-size 0 makes 4 x 4 tokens."""
        side, channels = self.image_size, self.image_channels
        if self.features == "scattering":
            from .data.scattering import COEFFICIENTS, scattering_grid

            side, channels = scattering_grid(side), channels * COEFFICIENTS
        return side, channels, self.patch_size or max(side // 4, 1)

    def model_config(self, num_classes: int = 10) -> MoEConfig:
        from .models.moe import MoEConfig

        side, channels, patch = self.input_grid()
        return MoEConfig(
            image_size=side, in_channels=channels, num_classes=num_classes,
            patch_size=patch, head=self.head, d_model=self.d_model, num_moe_layers=self.num_moe_layers,
            num_experts=self.num_experts, top_k=self.top_k, expert_hidden=self.expert_hidden,
            router_noise=self.router_noise, aux_loss_weight=self.aux_loss_weight,
            z_loss_weight=self.z_loss_weight, personal_expert=self.personal_expert,
        )

    @property
    def personal_parts(self) -> list[str]:
        """The parts personalize names ('head,router' -> ['head', 'router']; 'none' -> [])."""
        from .federation.personalization import parse_parts

        return parse_parts(self.personalize)

    @property
    def personal_expert(self) -> bool:
        """Whether each MoE layer has an expert that every site keeps (personalize=expert)."""
        return "expert" in self.personal_parts


def launch_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` as the launcher submits it, after every check of RunConfig and of the folders
    the run reads on this machine (text-dir, made absolute: the apps run in another working
    directory). Raises ConfigError, one line per problem, before Flower, Ray or torch start."""
    config = dict(config)
    problems, cfg = [], None
    try:
        cfg = RunConfig.from_run_config(config)
    except ConfigError as exc:
        problems.extend(str(exc).splitlines())
    for key in ("text-dir", "data-path"):
        if config.get(key):
            folder = Path(str(config[key])).expanduser().resolve()
            config[key] = str(folder)
            if not folder.is_dir():
                problems.append(f"run config '{key}': no such folder, got {str(folder)!r}")
    if config.get("site-registry"):
        from .federation.site_binding import read_registry

        config["site-registry"] = str(Path(str(config["site-registry"])).expanduser().resolve())
        try:
            read_registry(config["site-registry"])
        except ValueError as exc:
            problems.append(str(exc))
    task = str(config.get("task", ""))
    path = cfg.model_path if cfg and cfg.task == "hf-moe" else ""
    if path and (Path(path).expanduser().exists() or path.startswith((".", "/", "~"))):  # else a hub model id
        config["model-path"] = str(Path(path).expanduser().resolve())
        problems += model_path_problems(config["model-path"], cfg.num_experts, cfg.top_k, cfg.num_moe_layers, cfg.seq_len)
    if ":" in task and not _importable(task.partition(":")[0]):
        problems.append(f"run config 'task': no module {task.partition(':')[0]!r} to import (put it beside "
                        f"pyproject.toml, or install it), got {task!r}")
    if problems:
        raise ConfigError("\n".join(problems))
    return config


def _importable(module: str) -> bool:
    """Whether the apps can import ``module`` (from the Flower app folder or the environment),
    found without running it."""
    from .api import put_app_on_path

    put_app_on_path()
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def config_key(field_name: str) -> str:
    return field_name.replace("_", "-")


def unknown_key_message(key: str, known) -> str:
    close = difflib.get_close_matches(key.replace("_", "-"), list(known), n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else "every key is in [tool.flwr.app.config] of pyproject.toml"
    return f"run config '{key}': unknown key; {hint}"


def _coerce(key: str, raw: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false"):
            return raw.lower() == "true"
    elif kind is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
    elif kind is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
    elif kind is str:
        if isinstance(raw, str):
            return raw
    raise ConfigError(f"run config '{key}': expected {kind.__name__}, got {raw!r}")
