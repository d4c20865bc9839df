"""Run the fedmoe Flower app once, through ``flwr run``, and return its summary.

Target "simulation" (default): a private simulation SuperLink (``flower-superlink --simulation``)
is started on a free loopback port with its own FLWR_HOME and a neutral working directory, the
app is submitted with ``flwr run <app> <connection> --stream``, and the SuperLink is stopped
afterwards, so no stale SuperLink from another checkout can serve an old ClientApp.
Any other target names a SuperLink connection in the user's FLWR_HOME (a deployment).
``--ray-address HOST:PORT`` runs the simulation on an existing Ray cluster instead of a Ray
instance of its own: the SuperLink's Ray backend connects to it (RAY_ADDRESS), and the sites'
ClientApp actors spread over its nodes, one CPU each.

``flwr run`` exits 0 even when the run failed, so success is read from the run's summary.json.

    python -m experiments.launch [--sites N] [--target NAME] [--ray-address HOST:PORT] [-c "key=value" ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .reporting import add_run_config_argument, checked_run_config, parse_overrides

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SIMULATION = "simulation"


class RunFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class Target:
    """Where runs go: ``simulation`` (a private simulation SuperLink per run) or the name of a
    SuperLink connection in the FLWR_HOME of ``env`` (a deployment; its sites are the
    SuperNodes connected to it), the flwr CLI wrapped in ``prefix`` (e.g. ip netns exec HOST).
    The run's results-dir must be readable here at the same path (shared volume or host)."""

    connection: str = SIMULATION
    env: Mapping[str, str] | None = None
    prefix: tuple[str, ...] = ()
    ray_address: str | None = None  # simulation: an existing Ray cluster to run on

    def __str__(self) -> str:
        return self.connection


def toml_value(value: Any) -> str:
    """A run-config value as ``flwr run -c`` parses it (TOML scalars)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def config_args(overrides: Mapping[str, Any]) -> list[str]:
    return ["-c", " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())] if overrides else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RunFailed(f"flower-superlink exited with code {process.returncode}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as r:
                if r.status == 200:
                    return
        time.sleep(0.2)
    raise RunFailed(f"flower-superlink not healthy on port {port} after {timeout:.0f}s")


def write_connection(home: Path, name: str, address: str, root_certificates: str | None = None) -> None:
    """FLWR_HOME/config.toml with one SuperLink connection, the default (TLS when a CA is given)."""
    home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n'
    )


def flower_env(home: Path) -> dict[str, str]:
    """Environment for Flower processes: their own FLWR_HOME, and this venv's executables first on
    PATH (the SuperLink and SuperNodes spawn flower-superexec and the app processes by name)."""
    return {
        **os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
        # Ray's coming default (leave CUDA_VISIBLE_DEVICES alone when an actor asks for no GPU);
        # set, it also stops Ray's FutureWarning about the change in every run
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


@contextlib.contextmanager
def simulation_superlink(log_path: Path, ray_address: str | None = None) -> Iterator[tuple[str, dict[str, str]]]:
    """A private simulation SuperLink (on the Ray cluster at ``ray_address``, else on a Ray
    instance of its own); yields (connection name, environment for flwr)."""
    home = Path(tempfile.mkdtemp(prefix="fedmoe-flwr-home-"))
    port = free_port()
    env = flower_env(home)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    write_connection(home, "fedmoe-sim", f"127.0.0.1:{port}")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"fedmoe: Flower home {home} (removed when the run ends)\n".encode())
        log.flush()
        process = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
             "--port", str(port), "--disable-runtime-dependency-installation"],
            cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_healthy(port, process)
        yield "fedmoe-sim", env
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
        shutil.rmtree(home, ignore_errors=True)


def submit(app: Path, connection: str, env: Mapping[str, str], overrides: Mapping[str, Any],
           federation_config: Mapping[str, Any] | None, stream_to, prefix: Sequence[str] = (),
           timeout: float | None = None) -> None:
    cmd = [*prefix, str(BIN / "flwr"), "run", str(app), connection, "--stream", *config_args(overrides)]
    if federation_config:
        cmd += ["--federation-config", " ".join(f"{k}={toml_value(v)}" for k, v in federation_config.items())]
    print("+ " + shlex.join(cmd), file=stream_to, flush=True)
    completed = subprocess.run(cmd, env=dict(env), stdout=stream_to, stderr=subprocess.STDOUT, cwd=app, timeout=timeout)
    if completed.returncode != 0:
        raise RunFailed(f"flwr run exited with code {completed.returncode}")


def run_app(
    overrides: Mapping[str, Any] | None = None, *, sites: int = 3, target: Target = Target(),
    results_dir: Path | str | None = None, run_name: str | None = None,
    app: Path = ROOT, log_path: Path | None = None, quiet: bool = False, timeout: float | None = None,
) -> dict[str, Any]:
    """Run the app once on ``target`` (``sites`` SuperNodes when it is the simulation) and return
    its summary.json (raises RunFailed unless it completed). The results folder and run name are
    the arguments, else the run config's results-dir and run-name keys, else ./results and a
    time stamp."""
    overrides = dict(overrides or {})
    results_dir = Path(results_dir or overrides.get("results-dir") or "results").resolve()
    run_name = run_name or overrides.get("run-name") or f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    overrides.update({"results-dir": str(results_dir), "run-name": run_name})
    if not overrides.get("resume") and (results_dir / run_name).exists():
        raise RunFailed(f"run folder {results_dir / run_name} exists; choose another run name")
    log_path = log_path or results_dir / f"{run_name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log_file:
        stream_to = log_file if quiet else None
        out = stream_to or sys.stdout
        if target.connection == SIMULATION:
            fed = {"num-supernodes": sites, "client-resources-num-cpus": 1}
            with simulation_superlink(log_path.with_suffix(".superlink.log"), target.ray_address) as (connection, sim_env):
                submit(app, connection, sim_env, overrides, fed, out, timeout=timeout)
        else:
            submit(app, target.connection, target.env or os.environ, overrides, None, out, target.prefix, timeout)
    # a resumed run continues in the folder it resumes
    summary_path = (results_dir / str(overrides.get("resume") or run_name)).resolve() / "summary.json"
    if not summary_path.exists():
        raise RunFailed(f"run wrote no {summary_path}; see {log_path}")
    summary = json.loads(summary_path.read_text())
    if summary.get("status") != "completed":
        why = f" ({summary['failure']})" if summary.get("failure") else ""
        raise RunFailed(f"run {run_name} ended with status {summary.get('status')!r}{why}; see {log_path}")
    return summary


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so context managers stop the Flower processes they started
    (they run in their own sessions and would otherwise outlive a killed driver)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=3, help="simulated sites (SuperNodes)")
    parser.add_argument("--target", default=SIMULATION, help="'simulation' or a SuperLink connection name")
    parser.add_argument("--ray-address", help="simulation: run on the existing Ray cluster at HOST:PORT")
    parser.add_argument("--results-dir", help="where run folders go (default: the run config's results-dir, results/)")
    add_run_config_argument(parser)
    args = parser.parse_args(argv)
    overrides = checked_run_config(parse_overrides(args.run_config))
    started = time.time()
    summary = run_app(overrides, sites=args.sites, target=Target(args.target, ray_address=args.ray_address),
                      results_dir=args.results_dir)
    rounds = summary["rounds"]
    run_dir = Path(summary["config"]["results-dir"]) / summary["config"]["run-name"]
    print(
        f"\nfedmoe: completed {len(rounds)} rounds in {time.time() - started:.0f}s; "
        f"final global accuracy {summary['final_accuracy']:.4f}; "
        f"mean uplink {sum(r['uplink_bytes'] for r in rounds) / len(rounds) / 1e6:.3f} MB/round "
        f"(full model {summary['full_model_bytes'] / 1e6:.3f} MB x {args.sites} sites = "
        f"{summary['full_model_bytes'] * args.sites / 1e6:.3f} MB)\n"
        f"{privacy_line(summary, run_dir)}\n"
        f"results: {run_dir / 'summary.json'}"
    )
    return 0


def privacy_line(summary: dict[str, Any], run_dir: Path) -> str:
    config = summary["config"]
    if not config["dp"]:
        return "differential privacy: OFF (dp=false)"
    eps = [r["epsilon_max"] for r in summary["rounds"] if r.get("epsilon_max") is not None]
    spent = f"{eps[-1]:.3f}" if eps else "n/a"
    line = (f"differential privacy: ON, DP-SGD per site; largest epsilon spent {spent} "
            f"(target {config['target-epsilon']}, delta {config['target-delta']}), ledgers in privacy_ledger.json "
            f"(check them: python -m fedmoe.privacy.audit {run_dir})")
    return "\n".join([line, *(f"WARNING: {w}" for w in summary.get("privacy_warnings", []))])


if __name__ == "__main__":
    sys.exit(main())
