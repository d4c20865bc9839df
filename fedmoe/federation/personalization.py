"""Personal parts: tensors a site keeps and trains for itself and never sends (run config
``personalize``, a comma-separated list of parts, or ``none``).

  head     the output head (``head.*``; hf-moe: ``hf.lm_head.*``): the site's own classifier (or
           next-token predictor) on the shared representation, as in FedPer / FedRep
  router   every MoE layer's router (``*.router.*``; hf-moe: ``moe_layers.{l}.gate.*``): the
           site's own gating over the shared experts, as pFedMoE's personal gate
  expert   one more expert in every MoE layer (``*.personal_expert.*``) that every token passes
           through beside its routed ones: the site's own feed-forward capacity grafted beside
           the shared bank, as pFedMoE / FLEx (fedmoe.models.moe.PersonalExpert; charlm and the
           image model, not hf-moe)

A site trains its personal parts in the same optimiser steps as everything else, so under DP they
are clipped and noised with the rest: the site's whole state stays an output of the accounted
DP-SGD mechanism, and what it sends keeps its guarantee; the personal parts just never leave (they
are not releases at all). They persist in the site's node state and its state folder, like its
privacy ledger, so a restarted site keeps them. The server never aggregates them: the global
model's copies keep their initial values, so with ``personalize`` the meaningful accuracy is each
site's on its own test split, with its own parts.

``personal-model=ditto`` is the other way a site gets something of its own: a whole personal
model trained beside the federated one on Ditto's objective (fedmoe.training.ProximalLoss) without
noise, after the site's reply is complete, and never read by it (clients.app.train_personal_model).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

PARTS = {"head": re.compile(r"^(hf\.lm_head|head)\."), "router": re.compile(r"(^|\.)router\.|^moe_layers\.\d+\.gate\."),
         "expert": re.compile(r"(^|\.)personal_expert\.")}


def parse_parts(personalize: str) -> list[str]:
    """'head,router' -> ['head', 'router']; 'none' or '' -> []; raises ValueError on unknown parts."""
    parts = [p.strip() for p in personalize.split(",") if p.strip() and p.strip() != "none"]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown personal parts {unknown}; known: {sorted(PARTS)}")
    return parts


def personal_keys(keys: Iterable[str], personalize: str) -> frozenset[str]:
    """The tensor names among ``keys`` that belong to a personal part."""
    patterns = [PARTS[p] for p in parse_parts(personalize)]
    return frozenset(k for k in keys if any(p.search(k) for p in patterns))
