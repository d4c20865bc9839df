"""Run the deployment topology of fedmoe.deployment as local processes (what docker compose runs
as containers): on loopback, or one host per network namespace.

    python -m experiments.deploy --sites 3 --workdir /tmp/fedmoe-deploy -c "num-server-rounds=2"

starts the SuperLink, its ServerApp SuperExec, and per site a SuperNode and its ClientApp
SuperExec, runs the app through ``flwr run`` against them (experiments.launch with a named
connection) and stops everything. Tests use ``LocalDeployment`` directly.

Secure unless ``--insecure``: docker/make-credentials.sh makes the CA, certificates, SuperNode
keys and SuperExec secrets in WORKDIR/secrets; the SuperLink requires TLS and SuperNode
authentication; each site's public key is registered with ``flwr supernode register`` and the
node id it gets goes into the site registry the ServerApp binds sites to (``site-registry``).

``--app-timeline`` also records every app process Flower starts (experiments.process_timeline:
one ``flwr-clientapp`` per message): when it ran and the CPU time it used, printed as a table
beside the rounds' end times and saved as WORKDIR/logs/app-processes.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedmoe.deployment import SUPERLINK_PARTY, Secrets, Service, site_party, topology

from .launch import (
    BIN, Target, exit_on_sigterm, flower_env, free_port, run_app, wait_healthy, write_connection,
)
from .process_timeline import ProcessTimeline, format_timeline
from .reporting import add_run_config_argument, checked_run_config, parse_overrides

CONNECTION = "fedmoe-deploy"
MAKE_CREDENTIALS = Path(__file__).resolve().parent.parent / "docker" / "make-credentials.sh"


@dataclass
class Host:
    """Where a service runs: its address and how to prefix its command (e.g. ip netns exec)."""

    address: str = "127.0.0.1"
    prefix: tuple[str, ...] = ()


class LocalDeployment:
    """The compose services as processes. ``host_of(service name) -> Host`` places them."""

    def __init__(self, sites: int, workdir: Path, insecure: bool = False,
                 host_of: Callable[[str], Host] | None = None) -> None:
        self.sites = sites
        self.workdir = Path(workdir).resolve()
        self.secrets_dir = self.workdir / "secrets"
        self.secrets = None if insecure else Secrets.on_host(str(self.secrets_dir))
        self.host_of = host_of or (lambda name: Host())
        self.superlink_port = free_port()
        self.node_ports = [free_port() for _ in range(sites)]
        self.processes: dict[str, subprocess.Popen] = {}
        self.log_starts: dict[str, int] = {}
        self.site_registry: dict[str, int] = {}
        self.services = {s.name: s for s in topology(
            sites, secrets=self.secrets, superlink_host=self.host_of("superlink").address,
            node_host=lambda i: self.host_of(f"supernode-{i}").address, bind="0.0.0.0",
            superlink_port=self.superlink_port, node_port=lambda i: self.node_ports[i],
            state_root=str(self.workdir / "state"), results_dir=str(self.workdir / "results"),
        )}
        self.flwr_home = self.workdir / "flwr-home"
        self.env = flower_env(self.flwr_home)
        # every site's app processes share this machine's cores (in compose, each site is its own
        # machine): torch's default of one thread per core in each would oversubscribe them, which
        # measured 5 times slower training steps on 2 cores than one thread each
        self.env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // sites)))

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
            self.log_starts[name] = log.tell()  # the log is appended to across starts
            log.write(f"+ {shlex.join(argv)}\n".encode())
            process = subprocess.Popen(argv, cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.processes[name] = process
        return process

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.secrets is None:
            print("experiments.deploy: INSECURE deployment (plain HTTP, no SuperNode authentication): anyone who "
                  "reaches the SuperLink port may join", file=sys.stderr)
        else:
            self.make_credentials()
        ca = self.secrets.path(SUPERLINK_PARTY, "ca.crt") if self.secrets else None
        write_connection(self.flwr_home, CONNECTION, self.superlink_address, ca)
        link = self.start_service("superlink")
        self.wait_for_superlink(link)
        if self.secrets is not None:
            self.site_registry = self.register_sites()
            self.registry_path.write_text(json.dumps(self.site_registry, indent=2) + "\n")
        self.start_service("serverapp")
        for i in range(self.sites):
            self.start_service(f"supernode-{i}")
            self.start_service(f"clientapp-{i}")

    def log_since_start(self, name: str) -> str:
        """What the service's latest process wrote to its log."""
        with open(self.log_path(name), "rb") as log:
            log.seek(self.log_starts.get(name, 0))
            return log.read().decode(errors="replace")

    @property
    def registry_path(self) -> Path:
        return self.secrets_dir / SUPERLINK_PARTY / "site-registry.json"

    def make_credentials(self) -> None:
        """Every party's secrets (docker/make-credentials.sh), server certificates valid for
        every address a service of this deployment is reached at."""
        addresses = sorted({self.host_of(name).address for name in self.services} - {"127.0.0.1"})
        subprocess.run(["bash", str(MAKE_CREDENTIALS), str(self.secrets_dir), str(self.sites),
                        *(f"IP:{a}" for a in addresses)], check=True, capture_output=True)

    def flwr(self, *args: str) -> subprocess.CompletedProcess:
        """The flwr CLI against this deployment's SuperLink (from the SuperLink's host)."""
        return subprocess.run([*self.host_of("superlink").prefix, str(BIN / "flwr"), *args], env=self.env,
                              capture_output=True, text=True, timeout=60)

    def register_sites(self) -> dict[str, int]:
        """Site -> node id for every site: kept from the registry file where the SuperLink (its
        database survives restarts) still knows that node, else registered now."""
        known = json.loads(self.registry_path.read_text()) if self.registry_path.exists() else {}
        listed = json.loads(self.flwr("supernode", "list", CONNECTION, "--format", "json").stdout or "{}")
        if not listed.get("success"):
            raise RuntimeError(f"flwr supernode list failed: {listed}")
        alive = {int(node["node-id"]) for node in listed.get("nodes", []) if node.get("deleted-at") in (None, "N/A")}
        return {str(i): known[str(i)] if known.get(str(i)) in alive
                else self.register(self.secrets.path(site_party(i), "supernode.key.pub")) for i in range(self.sites)}

    def register(self, public_key: str) -> int:
        """Register a SuperNode public key with the SuperLink (flwr supernode register); its node id."""
        done = self.flwr("supernode", "register", public_key, CONNECTION, "--format", "json")
        reply = json.loads(done.stdout or "{}")  # with --format json flwr exits 0 even on failure
        if not reply.get("success"):
            raise RuntimeError(f"flwr supernode register {public_key} failed: {done.stdout} {done.stderr}")
        return int(reply["node-id"])

    def wait_for_superlink(self, process: subprocess.Popen, timeout: float = 60.0) -> None:
        if self.host_of("superlink").prefix or self.secrets:
            # not reachable from here over plain HTTP: wait for its log line instead
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise RuntimeError(f"superlink exited: see {self.log_path('superlink')}")
                if "Uvicorn running" in self.log_since_start("superlink"):
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
        """Submit the app with ``flwr run`` through this deployment's connection (sites bound to
        their registered nodes when secure); return its summary."""
        if self.site_registry:
            overrides = {"site-registry": str(self.registry_path), **overrides}
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


def print_timeline(rows: list[dict], deployment: LocalDeployment, summary: dict, path: Path) -> None:
    """The app processes' table, each ClientApp process named by the site whose SuperNode started
    it, and the rounds' end times since the ServerApp started (summary.json)."""
    site_of_port = {str(port): i for i, port in enumerate(deployment.node_ports)}

    def label(argv: list[str]) -> str:
        if "--runtime-api-address" not in argv:
            return ""
        port = argv[argv.index("--runtime-api-address") + 1].rsplit(":", 1)[-1]
        return f"site {site_of_port[port]}" if port in site_of_port else ""

    path.write_text(json.dumps(rows, indent=1))
    print(format_timeline(rows, label))
    print("rounds ended (seconds since the ServerApp started): "
          + ", ".join(f"{r['elapsed_seconds']:.1f}" for r in summary["rounds"]))


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("results") / "deploy")
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS, no SuperNode authentication: anyone who reaches the port may join (local trials only)")
    parser.add_argument("--app-timeline", action="store_true",
                        help="record when each app process ran and its CPU time (WORKDIR/logs/app-processes.json)")
    add_run_config_argument(parser)
    args = parser.parse_args(argv)
    overrides = checked_run_config(parse_overrides(args.run_config))
    started = time.time()
    with LocalDeployment(args.sites, args.workdir, insecure=args.insecure) as deployment:
        timeline = ProcessTimeline() if args.app_timeline else contextlib.nullcontext()
        with timeline:
            summary = deployment.run(overrides, run_name=time.strftime("%Y%m%d-%H%M%S"))
        if args.app_timeline:
            print_timeline(timeline.rows(), deployment, summary, args.workdir / "logs" / "app-processes.json")
    print(f"deployment run completed in {time.time() - started:.0f}s: final accuracy {summary['final_accuracy']:.4f}; "
          f"logs in {args.workdir / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
