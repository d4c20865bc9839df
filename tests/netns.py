"""Network namespaces as hosts: one per host, veth links to a bridge in a switch namespace,
private 10.200.0.0/24 addresses that exist only inside them."""

from __future__ import annotations

import os
import shutil
import subprocess

from experiments.deploy import Host


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def namespaces_available() -> str | None:
    """None when this machine can create namespaces, else the reason it cannot."""
    if shutil.which("ip") is None:
        return "iproute2 is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"fmprobe{os.getpid()}"
    done = ip("netns", "add", probe, check=False)
    if done.returncode != 0:
        return f"ip netns add failed: {done.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


class Network:
    """Hosts ``names`` on one switch; ``cut(name)`` takes a host's link down."""

    def __init__(self, names: list[str]) -> None:
        tag = f"fm{os.getpid() % 100000}"
        self.switch = f"{tag}-sw"
        self.hosts = {name: (f"{tag}-{i}", f"10.200.0.{10 + i}") for i, name in enumerate(names)}
        self.created: list[str] = []

    def up(self) -> None:
        ip("netns", "add", self.switch)
        self.created.append(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for i, (ns, address) in enumerate(self.hosts.values()):
            ip("netns", "add", ns)
            self.created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("link", "add", f"fmh{os.getpid() % 1000}x{i}", "type", "veth", "peer", "name", f"fmb{os.getpid() % 1000}x{i}")
            ip("link", "set", f"fmh{os.getpid() % 1000}x{i}", "netns", ns, "name", "eth0")
            ip("link", "set", f"fmb{os.getpid() % 1000}x{i}", "netns", self.switch, "name", f"port{i}")
            ip("-n", self.switch, "link", "set", f"port{i}", "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")

    def host(self, name: str) -> Host:
        ns, address = self.hosts[name]
        return Host(address=address, prefix=("ip", "netns", "exec", ns))

    def cut(self, name: str) -> None:
        index = list(self.hosts).index(name)
        ip("-n", self.switch, "link", "set", f"port{index}", "down")

    def down(self) -> None:
        for ns in reversed(self.created):
            ip("netns", "del", ns, check=False)
        self.created.clear()
