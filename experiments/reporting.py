"""Console progress and Markdown tables for the experiment drivers."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

# The image presets of the drivers were measured (BENCHMARKS.md) with the classifier reading
# pixels, before features=scattering became the default (2026-11-26): they keep pixels so that
# their commands still give those numbers.
PIXELS: dict[str, Any] = {"features": "pixels"}


def progress(done: int, total: int, started: float, label: str, width: int = 30) -> None:
    """One-line progress bar on stderr with elapsed time and a linear ETA."""
    elapsed = time.time() - started
    filled = int(width * done / max(total, 1))
    eta = f" eta {elapsed / done * (total - done):.0f}s" if 0 < done < total else ""
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {elapsed:.0f}s{eta} {label:<30}",
          end="\n" if done == total else "", file=sys.stderr, flush=True)


def driver_parser(description: str, presets: Sequence[str]) -> argparse.ArgumentParser:
    """The arguments every experiment driver takes: --preset, --out, --target, -c."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(presets), default="smoke")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--target", default="simulation",
                        help="'simulation' or a SuperLink connection name in $FLWR_HOME (a deployment)")
    add_run_config_argument(parser, "run-config overrides on top of the preset's")
    return parser


def add_run_config_argument(parser: argparse.ArgumentParser, help: str = '"key=value ..." overrides') -> None:
    parser.add_argument("-c", "--run-config", action="append", default=[], metavar='"key=value ..."', help=help)


def chosen_preset(presets: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The preset --preset names, its run config updated by the -c overrides and checked
    (``checked_run_config``); its dp-config (keys DP methods use on top), if any, checked on top of
    that, less the keys -c sets (an override wins everywhere)."""
    preset = presets[args.preset]
    overrides = parse_overrides(args.run_config)
    chosen = {**preset, "config": checked_run_config({**preset["config"], **overrides})}
    if "dp-config" in preset:
        chosen["dp-config"] = {k: v for k, v in preset["dp-config"].items() if k not in overrides}
        checked_run_config({**chosen["config"], **chosen["dp-config"], "dp": True})
    return chosen


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """-c arguments -> {key: value}, by Flower's own parser: exactly what ``flwr run -c`` takes
    ("key=value ...", values TOML scalars, strings quoted: partitioning='dirichlet'; or one
    .toml file). A malformed argument ends the process with status 2."""
    import click
    from flwr.common.config import parse_config_args

    try:
        return parse_config_args(list(items))
    except (click.ClickException, ValueError) as exc:
        exit_with_config_problems([f"-c {' '.join(items)!r}: {getattr(exc, 'message', exc)}"])


def checked_run_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` checked and completed by ``fedmoe.config.launch_config``; a bad config ends the
    process with status 2, one line per problem on stderr, before Flower, Ray or torch start."""
    from fedmoe.config import ConfigError, launch_config

    try:
        return launch_config(config)
    except ConfigError as exc:
        exit_with_config_problems(str(exc).splitlines())


def exit_with_config_problems(problems: Sequence[str]) -> NoReturn:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(2)


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


def read_rows(path: Path) -> list[dict[str, Any]]:
    """A driver's CSV of finished runs (strings), so an interrupted driver can skip them."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
