"""Run folder: per-round console table (also in run.log), summary.json, metrics.csv,
checkpoints, all written atomically.

A crash at any point leaves the previous summary.json and checkpoint intact: every file is
written to a temporary name in the same folder and moved into place with os.replace. Files get
the permissions the process's umask gives a new file (mkstemp's 0600 would hide results from
the group); what a site must keep to itself lives in its state folder, which it creates 0700.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import torch


def atomic_replace(path: Path, write: Callable[[str], None]) -> None:
    """Create ``path`` by ``write(temporary path)`` in the same folder, then os.replace: readers
    see the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Flower's log (fedmoe's lines included) also goes to ``path`` while the block runs."""
    from flwr.supercore.logger import LOGGER_NAME  # here: the privacy ledger and its audit need no Flower

    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_replace(path, write)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    atomic_replace(path, lambda tmp: torch.save(obj, tmp))


def point_latest(results_dir: Path, run_dir: Path) -> None:
    """results/latest -> the newest run folder (relative symlink, swapped atomically)."""
    link = results_dir / "latest"
    tmp = results_dir / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(run_dir.name, tmp)
    os.replace(tmp, link)


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """Digest of a model's tensors (names, dtypes, shapes, bytes) in key order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{list(t.shape)}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


METRICS_COLUMNS = ("round", "accuracy", "loss", "site_accuracy_mean", "uplink_bytes", "downlink_bytes", "epsilon_max",
                   "epsilon_mean", "expert_load_cv", "replies", "rejected_replies", "elapsed_seconds")


def metrics_csv(rounds: list[dict[str, Any]]) -> str:
    """metrics.csv: one row per round (rejected_replies counted; empty cells where a value is
    not measured, e.g. epsilon without DP)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(METRICS_COLUMNS)
    for row in rounds:
        site_acc = list(row.get("site_accuracy", {}).values())
        values = {**row, "site_accuracy_mean": sum(site_acc) / len(site_acc) if site_acc else None,
                  "rejected_replies": len(row.get("rejected_replies", []))}
        writer.writerow(["" if values.get(c) is None else values[c] for c in METRICS_COLUMNS])
    return out.getvalue()


def _format_experts(active: dict[str, list[int]]) -> str:
    return " ".join(f"{site}:{','.join(map(str, ids))}" for site, ids in sorted(active.items(), key=lambda kv: int(kv[0])))


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.3f}"


def rounds_without_updates(rounds: list[dict[str, Any]]) -> list[int]:
    """Rounds whose global model did not change: no train reply was valid (all rejected, lost, or
    from sites out of privacy budget)."""
    return [r["round"] for r in rounds if r.get("replies", 0) == 0]


def end_status(rounds: list[dict[str, Any]]) -> tuple[str, str | None]:
    """("completed", None), or ("failed", why) when the run trained nothing: no round aggregated
    an update and no site was out of budget (a spent budget is a legitimate reason to stop)."""
    idle = rounds_without_updates(rounds)
    if rounds and len(idle) == len(rounds) and not any(r.get("budget_exhausted") for r in rounds):
        return "failed", (f"no round aggregated a site update ({len(rounds)} rounds): every train reply "
                          "was rejected or lost; see rejected_replies and lost_nodes per round")
    return "completed", None


class RunRecorder:
    """Collects per-round rows, prints the console table and keeps summary.json current."""

    HEADER = f"{'round':>5} {'acc':>7} {'loss':>7} {'site acc':>8} {'up MB':>9} {'down MB':>9} {'load CV':>7} {'eps max':>7} {'eps mean':>8}  experts per site"

    def __init__(self, results_dir: str | Path, run_name: str, config: dict[str, Any], full_model_bytes: int,
                 extra: dict[str, Any] | None = None, resume: bool = False) -> None:
        """A new run folder, or (resume=True) the existing one, continued from its summary."""
        self.results_dir = Path(results_dir).resolve()
        self.run_dir = self.results_dir / run_name
        self.started = time.time()
        if resume:
            self.summary = json.loads((self.run_dir / "summary.json").read_text())
            self.summary.setdefault("resumes", []).append({"config": config})
            self.summary.update(extra or {}, status="running")
        else:
            self.run_dir.mkdir(parents=True, exist_ok=False)
            self.summary = {
                "config": config,
                "full_model_bytes": full_model_bytes,
                **(extra or {}),
                "rounds": [],
                "final_accuracy": None,
                "status": "running",
            }
        point_latest(self.results_dir, self.run_dir)
        self._write()

    def say(self, line: str) -> None:
        """A line for the console and run.log."""
        print(line, flush=True)
        with open(self.run_dir / "run.log", "a") as f:
            f.write(line + "\n")

    def keep_rounds_up_to(self, last_round: int) -> None:
        """Drop rows after the checkpoint a resumed run restarts from."""
        self.summary["rounds"] = [r for r in self.summary["rounds"] if r["round"] <= last_round]

    def record_round(self, row: dict[str, Any]) -> None:
        if not self.summary["rounds"]:
            self.say(self.HEADER)
        row["elapsed_seconds"] = round(time.time() - self.started, 2)  # since this ServerApp started
        self.summary["rounds"].append(row)
        self.summary["final_accuracy"] = row["accuracy"]
        self.summary["wall_seconds"] = round(time.time() - self.started, 2)
        eps = list(row.get("site_epsilon", {}).values())
        row["epsilon_max"] = max(eps) if eps else None
        row["epsilon_mean"] = sum(eps) / len(eps) if eps else None
        eps_cols = f"{max(eps):>7.3f} {row['epsilon_mean']:>8.3f}" if eps else f"{'-':>7} {'-':>8}"
        site_acc = list(row.get("site_accuracy", {}).values())
        site_col = f"{sum(site_acc) / len(site_acc):>8.4f}" if site_acc else f"{'-':>8}"
        skipped = f" (budget exhausted: {','.join(sorted(row['budget_exhausted']))})" if row.get("budget_exhausted") else ""
        self.say(
            f"{row['round']:>5} {row['accuracy']:>7.4f} {row['loss']:>7.4f} {site_col} {_mb(row['uplink_bytes']):>9} "
            f"{_mb(row['downlink_bytes']):>9} {row['expert_load_cv']:>7.3f} {eps_cols}  "
            f"{_format_experts(row['active_experts'])}{skipped}"
        )
        self._write()

    def checkpoint(self, server_round: int, state: dict[str, torch.Tensor], strategy_state: dict[str, Any]) -> None:
        """Model, round and strategy state after ``server_round``: all a resumed run needs."""
        atomic_torch_save(self.run_dir / "checkpoint.pt",
                          {"round": server_round, "model": state, "strategy": strategy_state})

    def load_checkpoint(self) -> dict[str, Any]:
        return torch.load(self.run_dir / "checkpoint.pt", weights_only=True)

    def write_privacy_ledger(self, ledgers: dict[str, str]) -> None:
        """privacy_ledger.json: per site, the accountant, its history and the epsilon it reported."""
        sites = {site: json.loads(text) for site, text in sorted(ledgers.items(), key=lambda kv: int(kv[0]))}
        atomic_write_json(self.run_dir / "privacy_ledger.json", {"sites": sites})

    def finish(self, status: str = "completed", **fields: Any) -> Path:
        self.summary.update(fields)
        self.summary["status"] = status
        self.summary["wall_seconds"] = round(time.time() - self.started, 2)
        self._write()
        return self.run_dir / "summary.json"

    def _write(self) -> None:
        atomic_write_json(self.run_dir / "summary.json", self.summary)
        atomic_write_bytes(self.run_dir / "metrics.csv", metrics_csv(self.summary["rounds"]).encode())
