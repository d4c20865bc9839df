"""The workloads a run can train (run config ``task``): the model, each site's data, the global
test set.

  fmnist   Fashion-MNIST images, patch-token MoE classifier (fedmoe.model), sites split by
           flwr-datasets partitioners (fedmoe.data)
  charlm   UTF-8 text, byte-level MoE transformer (fedmoe.charlm), one language (or
           languages-per-site languages) per site (fedmoe.text)
Both give tensors (inputs, targets) that fedmoe.training trains and evaluates alike.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from .charlm import CharLMConfig, CharMoETransformer
from .config import RunConfig
from .data import load_global_test, load_site
from .model import MoEClassifier
from .text import TextSplit, site_sources, split_corpus

# held-out windows per language in the global test set (central evaluation every round)
GLOBAL_TEST_WINDOWS = 400


def charlm_config(cfg: RunConfig) -> CharLMConfig:
    return CharLMConfig(
        seq_len=cfg.seq_len, d_model=cfg.d_model, num_heads=cfg.num_heads, num_moe_layers=cfg.num_moe_layers,
        num_experts=cfg.num_experts, top_k=cfg.top_k, expert_hidden=cfg.expert_hidden,
        router_noise=cfg.router_noise, aux_loss_weight=cfg.aux_loss_weight, z_loss_weight=cfg.z_loss_weight,
    )


def build_model(cfg: RunConfig) -> nn.Module:
    if cfg.task == "charlm":
        return CharMoETransformer(charlm_config(cfg))
    return MoEClassifier(cfg.model_config())


def site_corpora(cfg: RunConfig, site: int) -> list[tuple[str, str]]:
    """(label, source) of the corpora site ``site`` holds (charlm)."""
    sources = site_sources([lang for lang in cfg.languages.split(",") if lang], cfg.text_dir)
    per_site = 1 if cfg.text_dir else cfg.languages_per_site
    return [sources[(site * per_site + j) % len(sources)] for j in range(per_site)]


def site_label(cfg: RunConfig, site: int) -> str:
    """What distinguishes the site's data: its languages (charlm), else its partition id, with its
    domain when each site holds one (the domain split gives site i domain i mod 3)."""
    if cfg.task == "charlm":
        return "+".join(label for label, _ in site_corpora(cfg, site))
    if cfg.partitioning == "domain" and cfg.domains_per_site == 1:
        from .data import DOMAINS

        return f"{site} {list(DOMAINS)[site % len(DOMAINS)]}"
    return str(site)


@lru_cache(maxsize=4)
def site_data(cfg: RunConfig, site: int, num_sites: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train inputs, train targets, test inputs, test targets) of one site, cached per process."""
    if cfg.task == "charlm":
        splits = site_splits(cfg, site)
        train = torch.cat([s.train for s in splits])
        test = torch.cat([s.test for s in splits])
        return train[:, :-1], train[:, 1:], test[:, :-1], test[:, 1:]
    images = load_site(
        site, num_sites, partitioning=cfg.partitioning, alpha=cfg.dirichlet_alpha,
        domains_per_site=cfg.domains_per_site, seed=cfg.seed, test_fraction=cfg.site_test_fraction,
        source=cfg.data_source, max_examples=cfg.max_examples_per_site,
    )
    return (*images.train.tensors(), *images.test.tensors())


@lru_cache(maxsize=2)
def global_test(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out set the server evaluates on: the 10k Fashion-MNIST test images, or the first
    GLOBAL_TEST_WINDOWS held-out windows of every language (charlm)."""
    if cfg.task == "charlm":
        test = torch.cat([split.test for split in global_splits(cfg)])
        return test[:, :-1], test[:, 1:]
    return load_global_test(cfg.data_source).tensors()


def global_splits(cfg: RunConfig) -> list[TextSplit]:
    sources = site_sources([lang for lang in cfg.languages.split(",") if lang], cfg.text_dir)
    return [split_corpus(source, cfg.seq_len, GLOBAL_TEST_WINDOWS) for _, source in sources]


def bytes_per_character(splits: list[TextSplit]) -> float:
    """UTF-8 bytes per character of the splits' held-out windows (bits per byte -> per character)."""
    return sum(s.test_bytes for s in splits) / sum(s.test_characters for s in splits)


def site_splits(cfg: RunConfig, site: int) -> list[TextSplit]:
    return [split_corpus(source, cfg.seq_len, cfg.max_examples_per_site) for _, source in site_corpora(cfg, site)]
