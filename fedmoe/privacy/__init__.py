"""Differential privacy at a site: Opacus samplers for fedmoe's layers (``samplers``), DP-SGD
rounds (``dp_sgd``), accounting and the site's secret randomness (``accounting``), and the
outsider's check of a run's epsilons from its folder (``audit``, which imports none of the others)."""

from . import samplers  # noqa: F401  (registers the grad and norm samplers with Opacus)
from .accounting import (
    ACCOUNTANT,
    ACCOUNTANTS,
    HistoryEntry,
    PrivacyLedger,
    count_sensitivity,
    dp_generator,
    epsilon_of,
    merge_history,
    plan_noise_multiplier,
    release_counts,
)
from .dp_sgd import steps_per_epoch, train_private

__all__ = [
    "ACCOUNTANT", "ACCOUNTANTS", "HistoryEntry", "PrivacyLedger", "count_sensitivity", "dp_generator", "epsilon_of",
    "merge_history", "plan_noise_multiplier", "release_counts", "steps_per_epoch", "train_private",
]
