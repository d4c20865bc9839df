"""The app-process timeline of experiments.deploy: a process is found by its command, its life
and CPU time measured, and others are left out."""

import subprocess
import sys
import time

from experiments.process_timeline import ProcessTimeline, format_timeline

# about 0.6 s of CPU, then 0.6 s asleep; the last argument names the command the timeline looks for
BUSY_THEN_IDLE = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\ntime.sleep(0.6)"


def test_a_matching_process_is_timed_from_start_to_end_with_its_cpu_seconds_and_others_are_not():
    with ProcessTimeline(commands=("flwr-clientapp",), interval=0.05) as timeline:
        time.sleep(0.3)
        started = time.monotonic()
        app = subprocess.Popen([sys.executable, "-c", BUSY_THEN_IDLE, "flwr-clientapp"])
        other = subprocess.Popen([sys.executable, "-c", BUSY_THEN_IDLE, "something-else"])
        app.wait(), other.wait()
        lived = time.monotonic() - started
        time.sleep(0.3)
    rows = timeline.rows()
    assert [r["pid"] for r in rows] == [app.pid]
    row = rows[0]
    assert row["command"] == "flwr-clientapp"
    assert 0.25 <= row["start"] <= 0.3 + lived  # seconds since the timeline started
    assert 1.0 <= row["life"] <= lived + 0.1  # seen from its first sample to its last
    assert 0.5 <= row["cpu_seconds"] <= 1.0  # the busy part, not the sleep
    table = format_timeline(rows, label=lambda argv: argv[-1])
    assert table.splitlines()[2].startswith("| flwr-clientapp | ") and table.endswith("| flwr-clientapp |")
