"""Micro-benchmark: simulation wall time and peak memory with many sites.

    python -m experiments.scale_bench [--sites 100] [--rounds 3] [--out DIR] [-c "key=value ..."]

Runs the fedmoe app in the Flower simulation with ``--sites`` SuperNodes (IID split of the 60k
training images, DP off unless -c says otherwise) and samples, every half second, the summed
resident memory of this driver's process tree (the simulation SuperLink, the simulation process
with its Ray workers, the flwr CLI). Prints wall time, per-round seconds and peak memory; with
--out writes scale.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from .launch import exit_on_sigterm, run_app
from .reporting import PIXELS, add_run_config_argument, checked_run_config, parse_overrides, save_json


def tree_rss(root: int) -> int:
    """Summed resident memory (bytes) of ``root`` and its descendants, from /proc (Linux)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            parents[int(entry.name)] = int(fields[1])
            rss[int(entry.name)] = int((entry / "statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue  # exited while being read
    tree, frontier = {root}, [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    return sum(rss.get(pid, 0) for pid in tree)


class PeakMemory:
    """Peak summed RSS of this process and all its descendants, sampled in a thread."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(os.getpid()))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    add_run_config_argument(parser)
    args = parser.parse_args(argv)
    overrides = {**PIXELS, "num-server-rounds": args.rounds, "partitioning": "iid", "dp": False}
    overrides = checked_run_config(overrides | parse_overrides(args.run_config))
    started = time.time()
    with PeakMemory() as memory:
        summary = run_app(overrides, sites=args.sites, results_dir=Path(tempfile.mkdtemp(prefix="fedmoe-scale-")),
                          run_name="scale", quiet=True)
    wall = time.time() - started
    elapsed = [r["elapsed_seconds"] for r in summary["rounds"]]
    server = [r["server_seconds"] for r in summary["rounds"]]
    result = {
        "sites": args.sites, "rounds": args.rounds, "config": overrides, "wall_seconds": round(wall, 1),
        "round_elapsed_seconds": elapsed, "final_accuracy": summary["final_accuracy"],
        "replies_per_round": [r["replies"] for r in summary["rounds"]],
        "peak_rss_MB": round(memory.peak / 1e6, 1),
        "server_seconds_per_round": server, "server_share": server_share(elapsed, server),
    }
    print(f"{args.sites} sites x {args.rounds} rounds: wall {wall:.0f}s (rounds done at {elapsed} s), "
          f"replies {result['replies_per_round']}, final accuracy {summary['final_accuracy']:.4f}, "
          f"peak memory of the process tree {result['peak_rss_MB']} MB\n"
          f"strategy's own work (addressing, decoding and checking replies, aggregating) per round: "
          + "; ".join(", ".join(f"{k} {v:.2f}s" for k, v in s.items()) for s in server)
          + f"\nshare of the run up to the last round's evaluation: {result['server_share']:.1%}")
    save_json(result, args.out, "scale.json")
    return 0


def server_share(elapsed: list[float], server: list[dict[str, float]]) -> float:
    """The strategy's seconds over the ServerApp's seconds until the last round was evaluated
    (Ray start-up and the first model build included in the denominator)."""
    return sum(sum(parts.values()) for parts in server) / elapsed[-1]


if __name__ == "__main__":
    sys.exit(main())
