"""Console progress and Markdown tables for the experiment drivers."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any


def progress(done: int, total: int, started: float, label: str, width: int = 30) -> None:
    """One-line progress bar on stderr with elapsed time and a linear ETA."""
    elapsed = time.time() - started
    filled = int(width * done / max(total, 1))
    eta = f" eta {elapsed / done * (total - done):.0f}s" if 0 < done < total else ""
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {elapsed:.0f}s{eta} {label:<30}",
          end="\n" if done == total else "", file=sys.stderr, flush=True)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
