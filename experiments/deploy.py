"""Run the deployment topology of fedmoe.deployment as local processes (what docker compose runs
as containers): on loopback, or one host per network namespace.

    python -m experiments.deploy --sites 3 --workdir /tmp/fedmoe-deploy -c "num-server-rounds=2"

starts the SuperLink, its ServerApp SuperExec, and per site a SuperNode and its ClientApp
SuperExec, runs the app through ``flwr run`` against them (experiments.launch with a named
connection) and stops everything. Tests use ``LocalDeployment`` directly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedmoe.deployment import Service, Tls, topology

from .launch import (
    BIN, Target, exit_on_sigterm, flower_env, free_port, run_app, wait_healthy, write_connection,
)
from .reporting import add_run_config_argument, checked_run_config, parse_overrides

CONNECTION = "fedmoe-deploy"


@dataclass
class Host:
    """Where a service runs: its address and how to prefix its command (e.g. ip netns exec)."""

    address: str = "127.0.0.1"
    prefix: tuple[str, ...] = ()


class LocalDeployment:
    """The compose services as processes. ``host_of(service name) -> Host`` places them."""

    def __init__(self, sites: int, workdir: Path, tls: Tls | None = None,
                 host_of: Callable[[str], Host] | None = None) -> None:
        self.sites = sites
        self.workdir = Path(workdir).resolve()
        self.tls = tls
        self.host_of = host_of or (lambda name: Host())
        self.superlink_port = free_port()
        self.node_ports = [free_port() for _ in range(sites)]
        self.processes: dict[str, subprocess.Popen] = {}
        self.services = {s.name: s for s in topology(
            sites, tls=tls, superlink_host=self.host_of("superlink").address,
            node_host=lambda i: self.host_of(f"supernode-{i}").address, bind="0.0.0.0",
            superlink_port=self.superlink_port, node_port=lambda i: self.node_ports[i],
            state_root=str(self.workdir / "state"), results_dir=str(self.workdir / "results"),
        )}
        self.flwr_home = self.workdir / "flwr-home"
        self.env = flower_env(self.flwr_home)

    @property
    def superlink_address(self) -> str:
        return f"{self.host_of('superlink').address}:{self.superlink_port}"

    def log_path(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    def start_service(self, name: str) -> subprocess.Popen:
        service: Service = self.services[name]
        host = self.host_of(name)
        for volume in service.volumes:
            path = volume.split(":")[1]
            if path.startswith(str(self.workdir)):
                Path(path).mkdir(parents=True, exist_ok=True)
        (self.workdir / "state" / "superlink").mkdir(parents=True, exist_ok=True)
        self.log_path(name).parent.mkdir(parents=True, exist_ok=True)
        argv = [*host.prefix, str(BIN / service.argv[0]), *service.argv[1:]]
        with open(self.log_path(name), "ab") as log:
            log.write(f"+ {shlex.join(argv)}\n".encode())
            process = subprocess.Popen(argv, cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.processes[name] = process
        return process

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_connection(self.flwr_home, CONNECTION, self.superlink_address, self.tls.ca_cert if self.tls else None)
        link = self.start_service("superlink")
        self.wait_for_superlink(link)
        self.start_service("serverapp")
        for i in range(self.sites):
            self.start_service(f"supernode-{i}")
            self.start_service(f"clientapp-{i}")

    def wait_for_superlink(self, process: subprocess.Popen, timeout: float = 60.0) -> None:
        if self.host_of("superlink").prefix or self.tls:
            # not reachable from here over plain HTTP: wait for its log line instead
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise RuntimeError(f"superlink exited: see {self.log_path('superlink')}")
                if "Uvicorn running" in self.log_path("superlink").read_text(errors="replace"):
                    return
                time.sleep(0.2)
            raise RuntimeError("superlink did not start")
        wait_healthy(self.superlink_port, process, timeout)

    def stop_service(self, name: str, sig: int = signal.SIGTERM) -> None:
        process = self.processes.pop(name, None)
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop(self) -> None:
        # apps first, then nodes, then the link
        for name in sorted(self.processes, key=lambda n: ("app" not in n, n.startswith("superlink"))):
            self.stop_service(name)

    @property
    def target(self) -> Target:
        """This deployment as a target for experiments.launch and the experiment drivers."""
        return Target(CONNECTION, self.env, self.host_of("superlink").prefix)

    def run(self, overrides: dict, run_name: str, timeout: float = 900) -> dict:
        """Submit the app with ``flwr run`` through this deployment's connection; return its summary."""
        return run_app(overrides, target=self.target, results_dir=self.workdir / "results", run_name=run_name,
                       quiet=True, timeout=timeout)

    def __enter__(self) -> "LocalDeployment":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("results") / "deploy")
    add_run_config_argument(parser)
    args = parser.parse_args(argv)
    overrides = checked_run_config(parse_overrides(args.run_config))
    started = time.time()
    with LocalDeployment(args.sites, args.workdir) as deployment:
        summary = deployment.run(overrides, run_name=time.strftime("%Y%m%d-%H%M%S"))
    print(f"deployment run completed in {time.time() - started:.0f}s: final accuracy {summary['final_accuracy']:.4f}; "
          f"logs in {args.workdir / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
