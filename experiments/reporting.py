"""Console progress and Markdown tables for the experiment drivers."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def progress(done: int, total: int, started: float, label: str, width: int = 30) -> None:
    """One-line progress bar on stderr with elapsed time and a linear ETA."""
    elapsed = time.time() - started
    filled = int(width * done / max(total, 1))
    eta = f" eta {elapsed / done * (total - done):.0f}s" if 0 < done < total else ""
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {elapsed:.0f}s{eta} {label:<30}",
          end="\n" if done == total else "", file=sys.stderr, flush=True)


def driver_parser(description: str, presets: Sequence[str]) -> argparse.ArgumentParser:
    """The arguments every experiment driver takes: --preset, --out, --target."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(presets), default="smoke")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--target", default="simulation",
                        help="'simulation' or a SuperLink connection name in $FLWR_HOME (a deployment)")
    return parser


def save_axes(fig, ax, path, xlabel: str, ylabel: str, title: str | None = None, legend_size: int = 7) -> None:
    """Label, grid and legend ``ax``, write ``fig`` as a PNG and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def save_json(result: dict[str, Any], out: Path | None, name: str) -> None:
    """Write ``result`` to out/name when an output folder was asked for."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(result, indent=2) + "\n")
