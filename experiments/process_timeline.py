"""Where a deployment round's time goes: the life and CPU time of every app process.

Flower 1.41's SuperExec starts one ``flwr-clientapp`` process per message (a train or evaluate
task of one site) and one ``flwr-serverapp`` per run. ``ProcessTimeline`` samples Linux's
/proc every ``interval`` seconds from a background thread and keeps, per process whose command
line names one of ``commands``: when it was first and last seen (seconds since the timeline
started) and the CPU seconds (user + system, all threads) it had used when last seen. A process
that lives less than one interval may be missed; app processes live seconds.

    with ProcessTimeline() as timeline:
        ...  # run the app
    print(format_timeline(timeline.processes))
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

APP_COMMANDS = ("flwr-clientapp", "flwr-serverapp")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class AppProcess:
    pid: int
    command: str  # which of the commands
    argv: list[str]
    start: float  # seconds since the timeline started
    end: float
    cpu_seconds: float

    @property
    def life(self) -> float:
        return self.end - self.start


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads), None once it has gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime: fields 14 and 15 of stat


def command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


class ProcessTimeline:
    def __init__(self, commands: tuple[str, ...] = APP_COMMANDS, interval: float = 0.2) -> None:
        self.commands, self.interval = commands, interval
        self.processes: dict[int, AppProcess] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)
        self._started = 0.0

    def _matching(self, argv: list[str]) -> str | None:
        # the command may be an argument (python -m cProfile ... flwr-clientapp) or a path (.venv/bin/flwr-clientapp)
        return next((c for c in self.commands for arg in argv[:4] if os.path.basename(arg) == c), None)

    def sample(self) -> None:
        now = time.monotonic() - self._started
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            known = self.processes.get(pid)
            if known is None:
                # read again at every sample: a process seen between its fork and its exec has its parent's command line
                argv = command_line(pid)
                command = self._matching(argv)
                if command is None:
                    continue
                known = self.processes[pid] = AppProcess(pid, command, argv, now, now, 0.0)
            used = cpu_seconds(pid)
            if used is not None:
                known.end, known.cpu_seconds = now, used

    def _sample_until_stopped(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "ProcessTimeline":
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def rows(self) -> list[dict]:
        return [{**asdict(p), "life": p.life} for p in sorted(self.processes.values(), key=lambda p: p.start)]


def format_timeline(processes: list[dict], label=lambda argv: "") -> str:
    """A table of app processes by start: start, end, life and CPU seconds, and ``label(argv)``."""
    lines = ["| process | start s | end s | life s | CPU s | |", "|---|---|---|---|---|---|"]
    lines += [f"| {p['command']} | {p['start']:.1f} | {p['end']:.1f} | {p['life']:.1f} | {p['cpu_seconds']:.2f} | "
              f"{label(p['argv'])} |" for p in processes]
    return "\n".join(lines)
