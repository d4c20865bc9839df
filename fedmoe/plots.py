"""Figures a run writes into its folder."""

from __future__ import annotations

from collections.abc import Sequence


def plot_utilisation(panels: dict[str, dict[str, Sequence[float]]], path, title: str) -> None:
    """Heat maps, one panel per entry: rows are sites (or languages), columns experts, each cell
    the share of that row's routed tokens that went to the expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    height = 1.2 + 0.45 * sum(len(p) for p in panels.values()) + 0.6 * len(panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, height), squeeze=False)
    for ax, (name, rows) in zip(axes[:, 0], panels.items()):
        labels = sorted(rows, key=lambda s: (len(s), s))
        counts = np.array([rows[s] for s in labels], dtype=np.float64)
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-12)
        image = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0.0)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_xticks(range(shares.shape[1]))
        ax.tick_params(axis="x", labelsize=7 if shares.shape[1] <= 16 else 5)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_title(name, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.03)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height))  # keep the title clear of the first panel
    fig.savefig(path, dpi=120)
    plt.close(fig)


def utilisation_panels(site_counts: dict[str, Sequence[float]], num_experts: int,
                       label_of=str) -> dict[str, dict[str, list[float]]]:
    """One panel per MoE layer from per-site counts over global expert ids, rows named label_of(site)."""
    layers = len(next(iter(site_counts.values()))) // num_experts
    return {
        f"MoE layer {layer}": {label_of(site): list(counts[layer * num_experts:(layer + 1) * num_experts])
                               for site, counts in site_counts.items()}
        for layer in range(layers)
    }


def plot_learning_curve(rounds: Sequence[dict], path, title: str) -> None:
    """Global test accuracy against round, and (DP runs) the largest epsilon spent on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = [r["round"] for r in rounds]
    ax.plot(x, [r["accuracy"] for r in rounds], marker="o", color="tab:blue", label="global test accuracy")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy", color="tab:blue")
    ax.grid(True, alpha=0.3)
    eps = [(r["round"], r["epsilon_max"]) for r in rounds if r.get("epsilon_max") is not None]
    if eps:
        twin = ax.twinx()
        twin.plot(*zip(*eps), marker="s", color="tab:red", label="largest epsilon spent")
        twin.set_ylabel("epsilon (max over sites)", color="tab:red")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
