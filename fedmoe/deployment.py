"""Deployment topology: the single source of the commands behind docker-compose.yml and behind
the process launcher the deployment tests use.

One SuperLink (``--isolation process``) with a SuperExec that runs the ServerApp, and per site a
SuperNode (``--isolation process``) with its own SuperExec that runs the ClientApp. Every
command is built here; ``compose_yaml`` renders them for docker compose (host names are service
names) and ``experiments.deploy`` starts the same argv as local processes (host names become
addresses). ``python -m fedmoe.deployment > docker-compose.yml`` regenerates the compose file;
a test checks the committed file is that output.

Secure by default (``Secrets``, made by docker/make-credentials.sh): TLS on the SuperLink's port
and on each SuperNode's API for its SuperExec, SuperNode authentication (only SuperNodes whose
public key was registered with ``flwr supernode register`` may connect), and a shared secret
between each SuperExec and the SuperLink or SuperNode it serves. Each party's processes see only
its own folder. ``insecure`` (plain HTTP, anyone may connect) is for local trials only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

FLWR_VERSION = "1.41.0"
SUPERLINK_PORT = 8000
SUPERNODE_PORT = 9094
SECRETS_DIR = "/secrets"  # inside containers: the party's own folder of make-credentials.sh
HOST_SECRETS = "./deploy-secrets"  # on the docker host: the OUT_DIR given to make-credentials.sh
SUPERLINK_PARTY = "superlink"


def site_party(i: int) -> str:
    return f"site-{i}"


@dataclass(frozen=True)
class Secrets:
    """Where each process finds its party's files: ``path(party, file)``, party ``superlink`` or
    ``site-N``, files as docker/make-credentials.sh names them."""

    path: Callable[[str, str], str]

    @classmethod
    def in_containers(cls) -> "Secrets":
        return cls(lambda party, name: f"{SECRETS_DIR}/{name}")

    @classmethod
    def on_host(cls, root: str) -> "Secrets":
        return cls(lambda party, name: f"{root}/{party}/{name}")


def superlink_argv(*, host: str, port: int, database: str, secrets: Secrets | None) -> list[str]:
    argv = ["flower-superlink", "--isolation", "process", "--host", host, "--port", str(port),
            "--database", database, "--disable-runtime-dependency-installation"]
    if secrets is None:
        return argv + ["--insecure"]
    own = lambda name: secrets.path(SUPERLINK_PARTY, name)  # noqa: E731
    return argv + ["--ssl-ca-certfile", own("ca.crt"), "--ssl-certfile", own("server.pem"), "--ssl-keyfile",
                   own("server.key"), "--enable-supernode-auth", "--superexec-auth-secret-file", own("superexec.secret")]


def supernode_argv(*, superlink: str, host: str, port: int, partition_id: int, num_partitions: int,
                   state_dir: str, secrets: Secrets | None) -> list[str]:
    node_config = f"partition-id={partition_id} num-partitions={num_partitions} state-dir=\"{state_dir}\""
    argv = ["flower-supernode", "--superlink", superlink, "--isolation", "process", "--host", host,
            "--port", str(port), "--node-config", node_config]
    if secrets is None:
        return argv + ["--insecure"]
    own = lambda name: secrets.path(site_party(partition_id), name)  # noqa: E731
    return argv + ["--root-certificates", own("ca.crt"), "--auth-supernode-private-key", own("supernode.key"),
                   "--superexec-auth-secret-file", own("superexec.secret"),
                   "--ssl-certfile", own("runtime.pem"), "--ssl-keyfile", own("runtime.key"), "--ssl-ca-certfile", own("ca.crt")]


def superexec_argv(*, runtime: str, party: str, secrets: Secrets | None) -> list[str]:
    """SuperExec that pulls app tasks (ServerApp or ClientApp) from a runtime API at ``runtime``
    (the SuperLink's, or a SuperNode's), as ``party``."""
    argv = ["flower-superexec", "--runtime-api-address", runtime]
    if secrets is None:
        return argv + ["--insecure"]
    return argv + ["--root-certificates", secrets.path(party, "ca.crt"),
                   "--superexec-auth-secret-file", secrets.path(party, "superexec.secret")]


@dataclass
class Service:
    name: str
    argv: list[str]
    image: str  # "flwr" (stock flwr/<component> image) or "app" (project image)
    party: str  # whose service it is: superlink or site-N (whose secrets it may see)
    component: str = ""
    depends_on: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    ports: list[str] = field(default_factory=list)


def topology(sites: int, *, secrets: Secrets | None, superlink_host: str = "superlink", node_host=lambda i: f"supernode-{i}",
             bind: str = "0.0.0.0", superlink_port: int = SUPERLINK_PORT, node_port=lambda i: SUPERNODE_PORT,
             state_root: str = "/state", results_dir: str = "/app/results") -> list[Service]:
    """All services of a deployment with ``sites`` sites, each with the party it belongs to.
    Host names, ports and directories are parameters so the same commands run in containers and
    as local processes."""
    superlink = f"{superlink_host}:{superlink_port}"
    services = [
        Service("superlink", superlink_argv(host=bind, port=superlink_port, database=f"{state_root}/superlink/state.db",
                                            secrets=secrets),
                "flwr", SUPERLINK_PARTY, "superlink", volumes=["superlink-state:/state/superlink"],
                ports=[f"{superlink_port}:{superlink_port}"]),
        Service("serverapp", superexec_argv(runtime=superlink, party=SUPERLINK_PARTY, secrets=secrets), "app",
                SUPERLINK_PARTY, depends_on=["superlink"], volumes=[f"./results:{results_dir}"]),
    ]
    for i in range(sites):
        node = f"supernode-{i}"
        services.append(Service(
            node, supernode_argv(superlink=superlink, host=bind, port=node_port(i), partition_id=i,
                                 num_partitions=sites, state_dir=f"{state_root}/site-{i}", secrets=secrets),
            "flwr", site_party(i), "supernode", depends_on=["superlink"],
        ))
        services.append(Service(
            f"clientapp-{i}", superexec_argv(runtime=f"{node_host(i)}:{node_port(i)}", party=site_party(i), secrets=secrets),
            "app", site_party(i), depends_on=[node], volumes=[f"site-{i}-state:{state_root}/site-{i}"],
        ))
    if secrets is not None:  # each service sees its own party's folder, nothing else
        for s in services:
            s.volumes.append(f"{HOST_SECRETS}/{s.party}:{SECRETS_DIR}:ro")
    return services


def _yaml_list(items: list[str], indent: int) -> list[str]:
    pad = " " * indent
    return [f"{pad}- {_quote(x)}" for x in items]


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def compose_yaml(sites: int = 3, insecure: bool = False) -> str:
    """docker-compose file text (compose v1 and v2): TLS, SuperNode authentication and SuperExec
    secrets from ./deploy-secrets (docker/make-credentials.sh), or ``insecure`` for local trials."""
    services = topology(sites, secrets=None if insecure else Secrets.in_containers())
    flags = " --insecure" if insecure else ""
    lines = [
        f"# Generated by `python -m fedmoe.deployment --sites {sites}{flags}`; do not edit by hand",
        "# (tests/test_deployment.py checks it against fedmoe/deployment.py).",
    ]
    if insecure:
        lines.append("# INSECURE: plain HTTP and no SuperNode authentication; for local trials only.")
    else:
        lines += ["# Secrets: docker/make-credentials.sh ./deploy-secrets %d, then chown -R 49999:49999 ./deploy-secrets" % sites,
                  "# (the flwr images run as uid 49999); each service mounts only its own party's folder."]
    lines += ['version: "3.8"', "services:"]
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
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS, no SuperNode authentication: anyone who reaches the port may join (local trials only)")
    args = parser.parse_args(argv)
    sys.stdout.write(compose_yaml(args.sites, args.insecure))
    return 0


if __name__ == "__main__":
    sys.exit(main())
