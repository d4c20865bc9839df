"""The workloads a run can train (run config ``task``), behind one small interface.

A task gives the apps four things (``Task``): the model, one site's data, the server's held-out
set, and a label per site for tables; optionally a factor that turns its loss into bits per
character. Built in:

  fmnist   Fashion-MNIST images, patch-token MoE classifier (fedmoe.models.moe), sites split by
           flwr-datasets partitioners (fedmoe.data)
  images   your own images (data-path: an ImageFolder tree or a saved HF dataset), the same
           classifier sized to them (fedmoe.data.own_images)
  charlm   UTF-8 text, byte-level MoE transformer (fedmoe.models.charlm), one language (or
           languages-per-site languages) per site (fedmoe.data.text)
  hf-moe   the same text, a Hugging Face transformers MoE model (hf-model family built from the
           size keys, or model-path; fedmoe.models.hf_moe), exported with save_pretrained at the end

Your own task: ``task="module:ClassName"``, a ``Task`` subclass in a module the apps can import
(a file beside pyproject.toml travels with the app; README "Bring your own model").

What the model must be: ``forward(x) -> (logits [N, C] or [N, T, V], aux [N])`` with ``aux`` the
per-sample router losses, ``moe_layers`` (fedmoe.models.moe.MoELayer, whose expert banks are what
sites train selectively and send), ``routing_counts()`` (token-slots per global expert in the
last forward), ``config.total_experts`` and ``config.num_tokens`` (tokens each sample routes
through each MoE layer: it bounds one sample's effect on the released routing counts)
(fedmoe.models.moe.MoEClassifier and fedmoe.models.charlm.CharMoETransformer are examples). Every sample's
loss must depend on that sample only (DP-SGD clips per sample). The loss is cross-entropy of the
logits (mean over positions for sequences) plus ``aux``; the metrics are that loss and accuracy
(fedmoe.training), the same for every task.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from ..config import RunConfig
from .text import VOCAB_SIZE

Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

# held-out windows per language in the global test set (central evaluation every round)
GLOBAL_TEST_WINDOWS = 400


class Task:
    """A workload. Subclasses implement the first three methods; all take the run's config."""

    def build_model(self, cfg: RunConfig) -> nn.Module:
        """A freshly initialised model (the caller seeds torch first)."""
        raise NotImplementedError

    def site_data(self, cfg: RunConfig, site: int, num_sites: int) -> Tensors:
        """(train inputs, train targets, test inputs, test targets) of site ``site`` of ``num_sites``."""
        raise NotImplementedError

    def global_test(self, cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) the server evaluates the global model on every round."""
        raise NotImplementedError

    def site_label(self, cfg: RunConfig, site: int) -> str:
        """What distinguishes the site's data, for tables and plots."""
        return str(site)

    def bits_per_nat(self, cfg: RunConfig, site: int | None) -> float | None:
        """Factor from the loss (nats per target) to bits per character of the site's held-out
        text (None: the server's), or None when the task is not text."""
        return None

    def export(self, cfg: RunConfig, model: nn.Module, run_dir: Path) -> None:
        """Write the final global model in the task's own format into the run folder, beside
        fedmoe's checkpoint (nothing by default)."""


def classifier_inputs(cfg: RunConfig, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Images [N, C, H, W] as the classifier reads them: as they are, or their scattering features
    (features=scattering, fedmoe.data.scattering); other tensors (labels) unchanged."""
    if cfg.features != "scattering":
        return tensors
    from .scattering import cached_scattering_features

    return tuple(cached_scattering_features(t) if t.dim() == 4 else t for t in tensors)


class FashionMNISTTask(Task):
    def build_model(self, cfg: RunConfig) -> nn.Module:
        from ..models.moe import MoEClassifier

        return MoEClassifier(cfg.model_config())

    def site_data(self, cfg: RunConfig, site: int, num_sites: int) -> Tensors:
        from .fashion_mnist import load_site

        images = load_site(
            site, num_sites, partitioning=cfg.partitioning, alpha=cfg.dirichlet_alpha,
            domains_per_site=cfg.domains_per_site, seed=cfg.seed, test_fraction=cfg.site_test_fraction,
            source=cfg.data_source, max_examples=cfg.max_examples_per_site,
        )
        return classifier_inputs(cfg, *images.train.tensors(), *images.test.tensors())

    def global_test(self, cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """The official 10k test images."""
        from .fashion_mnist import load_global_test

        return classifier_inputs(cfg, *load_global_test(cfg.data_source).tensors())

    def site_label(self, cfg: RunConfig, site: int) -> str:
        """The partition id, with its domain when each site holds one (site i: domain i mod 3)."""
        if cfg.partitioning == "domain" and cfg.domains_per_site == 1:
            from .fashion_mnist import DOMAINS

            return f"{site} {list(DOMAINS)[site % len(DOMAINS)]}"
        return str(site)


class OwnImagesTask(Task):
    """Images at data-path (fedmoe.data.own_images), the patch-token MoE classifier sized to them."""

    def data(self, cfg: RunConfig):
        from .own_images import load_own_images

        return load_own_images(cfg.data_path, cfg.image_column, cfg.label_column,
                               cfg.site_column if cfg.partitioning == "column" else "",
                               cfg.image_size, cfg.image_channels, cfg.seed)

    def build_model(self, cfg: RunConfig) -> nn.Module:
        from ..models.moe import MoEClassifier

        return MoEClassifier(cfg.model_config(num_classes=self.data(cfg).num_classes))

    def site_data(self, cfg: RunConfig, site: int, num_sites: int) -> Tensors:
        from .own_images import own_site

        train, test = own_site(self.data(cfg), site, num_sites, cfg.partitioning, cfg.dirichlet_alpha,
                               cfg.domains_per_site, cfg.seed, cfg.site_test_fraction, cfg.max_examples_per_site)
        return classifier_inputs(cfg, *train.tensors(), *test.tensors())

    def global_test(self, cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
        return classifier_inputs(cfg, *self.data(cfg).test.tensors())


class CharLMTask(Task):
    def build_model(self, cfg: RunConfig) -> nn.Module:
        from ..models.charlm import CharMoETransformer

        return CharMoETransformer(charlm_config(cfg))

    def site_data(self, cfg: RunConfig, site: int, num_sites: int) -> Tensors:
        splits = site_splits(cfg, site)
        train = torch.cat([s.train for s in splits])
        test = torch.cat([s.test for s in splits])
        return train[:, :-1], train[:, 1:], test[:, :-1], test[:, 1:]

    def global_test(self, cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """The first GLOBAL_TEST_WINDOWS held-out windows of every language."""
        test = torch.cat([split.test for split in global_splits(cfg)])
        return test[:, :-1], test[:, 1:]

    def site_label(self, cfg: RunConfig, site: int) -> str:
        """The site's languages."""
        return "+".join(label for label, _ in site_corpora(cfg, site))

    def bits_per_nat(self, cfg: RunConfig, site: int | None) -> float:
        import math

        splits = global_splits(cfg) if site is None else site_splits(cfg, site)
        return bytes_per_character(splits) / math.log(2)


class HFMoETask(CharLMTask):
    """charlm's data and metrics (byte tokens: no tokenizer to fetch), a transformers MoE model."""

    def build_model(self, cfg: RunConfig) -> nn.Module:
        from ..models import hf_moe

        lora = (cfg.lora_rank, cfg.lora_alpha) if cfg.adapter == "lora" else (0, cfg.lora_alpha)
        if cfg.model_path:
            return hf_moe.load(cfg.model_path, cfg.seq_len, cfg.aux_loss_weight, cfg.z_loss_weight, *lora)
        hf_config = hf_moe.hf_config_for(cfg.hf_model, VOCAB_SIZE, cfg.d_model, cfg.num_moe_layers, cfg.num_heads,
                                         cfg.num_experts, cfg.top_k, cfg.expert_hidden, cfg.seq_len)
        return hf_moe.build(cfg.hf_model, hf_config, cfg.seq_len, cfg.aux_loss_weight, cfg.z_loss_weight, *lora)

    def export(self, cfg: RunConfig, model: nn.Module, run_dir: Path) -> None:
        """run_dir/hf_model: ``AutoModelForCausalLM.from_pretrained`` loads it (tokens are bytes)."""
        model.save_pretrained(run_dir / HF_MODEL_DIR)


HF_MODEL_DIR = "hf_model"
BUILT_IN: dict[str, type[Task]] = {"fmnist": FashionMNISTTask, "images": OwnImagesTask, "charlm": CharLMTask,
                                   "hf-moe": HFMoETask}


@lru_cache(maxsize=8)
def task_of(name: str) -> Task:
    """The task a run config names: a built-in one, or ``module:ClassName``."""
    if name in BUILT_IN:
        return BUILT_IN[name]()
    module, _, attr = name.partition(":")
    task = getattr(importlib.import_module(module), attr)()
    if not isinstance(task, Task):
        raise TypeError(f"run config 'task': {name} is not a fedmoe.data.tasks.Task")
    return task


def build_model(cfg: RunConfig) -> nn.Module:
    return task_of(cfg.task).build_model(cfg)


def initial_model(cfg: RunConfig) -> nn.Module:
    """The run's initial global model, built under the run's seed: anyone holding the run config
    rebuilds it bit for bit (run config derive-initial-model; the digest in each message checks it).
    The caller's random state is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return build_model(cfg)


@lru_cache(maxsize=4)
def site_data(cfg: RunConfig, site: int, num_sites: int) -> Tensors:
    """The site's tensors (Task.site_data), cached per process."""
    return task_of(cfg.task).site_data(cfg, site, num_sites)


@lru_cache(maxsize=2)
def global_test(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    return task_of(cfg.task).global_test(cfg)


def site_label(cfg: RunConfig, site: int) -> str:
    return task_of(cfg.task).site_label(cfg, site)


def bits_per_nat(cfg: RunConfig, site: int | None = None) -> float | None:
    return task_of(cfg.task).bits_per_nat(cfg, site)


def export(cfg: RunConfig, model: nn.Module, run_dir: Path) -> None:
    task_of(cfg.task).export(cfg, model, run_dir)


# charlm helpers


def charlm_config(cfg: RunConfig):
    from ..models.charlm import CharLMConfig

    return CharLMConfig(
        seq_len=cfg.seq_len, d_model=cfg.d_model, num_heads=cfg.num_heads, num_moe_layers=cfg.num_moe_layers,
        num_experts=cfg.num_experts, top_k=cfg.top_k, expert_hidden=cfg.expert_hidden,
        router_noise=cfg.router_noise, aux_loss_weight=cfg.aux_loss_weight, z_loss_weight=cfg.z_loss_weight,
        personal_expert=cfg.personal_expert,
    )


def site_corpora(cfg: RunConfig, site: int) -> list[tuple[str, str]]:
    """(label, source) of the corpora site ``site`` holds."""
    from .text import site_sources

    sources = site_sources([lang for lang in cfg.languages.split(",") if lang], cfg.text_dir)
    per_site = 1 if cfg.text_dir else cfg.languages_per_site
    return [sources[(site * per_site + j) % len(sources)] for j in range(per_site)]


def global_splits(cfg: RunConfig):
    from .text import site_sources, split_corpus

    sources = site_sources([lang for lang in cfg.languages.split(",") if lang], cfg.text_dir)
    return [split_corpus(source, cfg.seq_len, GLOBAL_TEST_WINDOWS) for _, source in sources]


def bytes_per_character(splits) -> float:
    """UTF-8 bytes per character of the splits' held-out windows (bits per byte -> per character)."""
    return sum(s.test_bytes for s in splits) / sum(s.test_characters for s in splits)


def site_splits(cfg: RunConfig, site: int):
    from .text import split_corpus

    return [split_corpus(source, cfg.seq_len, cfg.max_examples_per_site) for _, source in site_corpora(cfg, site)]
