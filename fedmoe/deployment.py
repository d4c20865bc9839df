"""Deployment topology: the single source of the commands behind docker-compose.yml and behind
the process launcher the deployment tests use.

One SuperLink (``--isolation process``) with a SuperExec that runs the ServerApp, and per site a
SuperNode (``--isolation process``) with its own SuperExec that runs the ClientApp. Every
command is built here; ``compose_yaml`` renders them for docker compose (host names are service
names) and ``experiments.deploy`` starts the same argv as local processes (host names become
addresses). ``python -m fedmoe.deployment > docker-compose.yml`` regenerates the compose file;
a test checks the committed file is that output.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

FLWR_VERSION = "1.41.0"
SUPERLINK_PORT = 8000
SUPERNODE_PORT = 9094
CERT_DIR = "/certs"  # inside containers


@dataclass(frozen=True)
class Tls:
    """Certificate files as the processes see them (paths inside containers, or on the host)."""

    ca_cert: str
    server_cert: str
    server_key: str


def superlink_argv(*, host: str, port: int, database: str, tls: Tls | None) -> list[str]:
    argv = ["flower-superlink", "--isolation", "process", "--host", host, "--port", str(port),
            "--database", database, "--disable-runtime-dependency-installation"]
    if tls is None:
        return argv + ["--insecure"]
    return argv + ["--ssl-ca-certfile", tls.ca_cert, "--ssl-certfile", tls.server_cert, "--ssl-keyfile", tls.server_key]


def supernode_argv(*, superlink: str, host: str, port: int, partition_id: int, num_partitions: int,
                   state_dir: str, tls: Tls | None) -> list[str]:
    node_config = f"partition-id={partition_id} num-partitions={num_partitions} state-dir=\"{state_dir}\""
    argv = ["flower-supernode", "--superlink", superlink, "--isolation", "process", "--host", host,
            "--port", str(port), "--node-config", node_config]
    if tls is None:
        return argv + ["--insecure"]
    return argv + ["--root-certificates", tls.ca_cert]


def superexec_argv(*, runtime: str, tls_ca: str | None = None) -> list[str]:
    """SuperExec that pulls app tasks (ServerApp or ClientApp) from a runtime API at ``runtime``."""
    argv = ["flower-superexec", "--runtime-api-address", runtime]
    return argv + (["--root-certificates", tls_ca] if tls_ca else ["--insecure"])


@dataclass
class Service:
    name: str
    argv: list[str]
    image: str  # "flwr" (stock flwr/<component> image) or "app" (project image)
    component: str = ""
    depends_on: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    ports: list[str] = field(default_factory=list)


def topology(sites: int, *, tls: Tls | None, superlink_host: str = "superlink", node_host=lambda i: f"supernode-{i}",
             bind: str = "0.0.0.0", superlink_port: int = SUPERLINK_PORT, node_port=lambda i: SUPERNODE_PORT,
             state_root: str = "/state", results_dir: str = "/app/results") -> list[Service]:
    """All services of a deployment with ``sites`` sites. Host names, ports and directories are
    parameters so the same commands run in containers and as local processes."""
    superlink = f"{superlink_host}:{superlink_port}"
    services = [
        Service("superlink", superlink_argv(host=bind, port=superlink_port, database=f"{state_root}/superlink/state.db", tls=tls),
                "flwr", "superlink", volumes=["superlink-state:/state/superlink"], ports=[f"{superlink_port}:{superlink_port}"]),
        Service("serverapp", superexec_argv(runtime=superlink, tls_ca=tls.ca_cert if tls else None), "app",
                depends_on=["superlink"], volumes=[f"./results:{results_dir}"]),
    ]
    for i in range(sites):
        node = f"supernode-{i}"
        services.append(Service(
            node, supernode_argv(superlink=superlink, host=bind, port=node_port(i), partition_id=i,
                                 num_partitions=sites, state_dir=f"{state_root}/site-{i}", tls=tls),
            "flwr", "supernode", depends_on=["superlink"],
        ))
        services.append(Service(
            f"clientapp-{i}", superexec_argv(runtime=f"{node_host(i)}:{node_port(i)}"), "app",
            depends_on=[node], volumes=[f"site-{i}-state:{state_root}/site-{i}"],
        ))
    if tls:
        for s in services:
            s.volumes.append(f"./docker/certs:{CERT_DIR}:ro")
    return services


def _yaml_list(items: list[str], indent: int) -> list[str]:
    pad = " " * indent
    return [f"{pad}- {_quote(x)}" for x in items]


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def compose_yaml(sites: int = 3, tls: bool = False, overlay: bool = False) -> str:
    """docker-compose file text (compose v1 and v2). ``overlay``: only what the TLS variant
    changes (commands and the certificate volume), for ``-f docker-compose.yml -f <overlay>``."""
    tls_files = Tls(f"{CERT_DIR}/ca.crt", f"{CERT_DIR}/server.pem", f"{CERT_DIR}/server.key") if tls else None
    services = topology(sites, tls=tls_files)
    flags = (" --tls" if tls else "") + (" --overlay" if overlay else "")
    lines = [
        f"# Generated by `python -m fedmoe.deployment --sites {sites}{flags}`; do not edit by hand",
        "# (tests/test_deployment.py checks it against fedmoe/deployment.py).",
        'version: "3.8"',
        "services:",
    ]
    if overlay:
        for s in services:
            lines += [f"  {s.name}:", "    command:", *_yaml_list(s.argv[1:], 6),
                      "    volumes:", *_yaml_list([v for v in s.volumes if v.startswith("./docker/certs")], 6)]
        return "\n".join(lines) + "\n"
    volumes = []
    for s in services:
        lines.append(f"  {s.name}:")
        if s.image == "flwr":
            lines.append(f"    image: flwr/{s.component}:{FLWR_VERSION}")
        else:
            lines += ["    build:", "      context: .", "      dockerfile: docker/Dockerfile",
                      f"    image: fedmoe-app:{FLWR_VERSION}"]
        lines.append("    command:")
        lines += _yaml_list(s.argv[1:], 6)
        lines.append(f"    entrypoint: [{_quote(s.argv[0])}]")
        if s.ports:
            lines.append("    ports:")
            lines += _yaml_list(s.ports, 6)
        if s.volumes:
            lines.append("    volumes:")
            lines += _yaml_list(s.volumes, 6)
            volumes += [v.split(":")[0] for v in s.volumes if not v.startswith(".")]
        if s.depends_on:
            lines.append("    depends_on:")
            lines += _yaml_list(s.depends_on, 6)
        lines.append("    restart: unless-stopped")
    if volumes:
        lines.append("volumes:")
        lines += [f"  {v}: {{}}" for v in dict.fromkeys(volumes)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the docker-compose file for a fedmoe deployment.")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--tls", action="store_true", help="the TLS variant (certificates from docker/make-certs.sh)")
    parser.add_argument("--overlay", action="store_true", help="only the TLS changes, as an override file")
    args = parser.parse_args(argv)
    sys.stdout.write(compose_yaml(args.sites, args.tls, args.overlay))
    return 0


if __name__ == "__main__":
    sys.exit(main())
