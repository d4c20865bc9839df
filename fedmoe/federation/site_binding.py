"""Which node speaks for which site.

A reply names its site (the partition-id of its node's config), but that is the node's claim.
The server binds each site to one node id, the id the SuperLink gives an authenticated node:
either from a registry the operator writes (``site-registry``: site -> node id, e.g. from
``flwr supernode register``), or on first use (the first node to claim a site within this
ServerApp process gets it); with a registry, nodes it does not list are not even sent the model.
Afterwards a reply counts only if it comes from the node bound to
the site it names; a node bound to one site cannot speak for another. Whatever a rejected reply
carried (update, epsilon, ledger, metrics) is dropped, so the per-site records and the privacy
ledger follow the bound node.
"""

from __future__ import annotations

import json
from pathlib import Path


class SiteBinding:
    def __init__(self, registry: dict[str, int] | None = None) -> None:
        self.fixed = registry is not None
        self.node_of: dict[str, int] = dict(registry or {})
        self.site_of: dict[int, str] = {node: site for site, node in self.node_of.items()}
        if len(self.site_of) != len(self.node_of):
            raise ValueError("site registry: one node id is given for two sites")

    def admits(self, node: int) -> bool:
        """Whether ``node`` may be sent the model: with a registry, only the nodes it lists."""
        return not self.fixed or node in self.site_of

    def check(self, node: int, site: str) -> str | None:
        """None if ``node`` may speak for ``site`` (binding them if neither is bound yet and no
        registry fixes the map), else why not."""
        bound_node, bound_site = self.node_of.get(site), self.site_of.get(node)
        if bound_node is None and bound_site is None:
            if self.fixed:
                return f"node {node} claims site {site}, which the site registry does not list"
            self.node_of[site], self.site_of[node] = node, site
            return None
        if bound_node == node:
            return None
        if bound_site is not None:
            return f"node {node} is bound to site {bound_site} but claims site {site}"
        return f"node {node} claims site {site}, which is bound to node {bound_node}"


def read_registry(path: str | Path) -> dict[str, int]:
    """A site registry file: JSON {"<site>": <node id>, ...}."""
    try:
        raw = json.loads(Path(path).read_text())
        registry = {str(site): int(node) for site, node in raw.items()}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"run config 'site-registry': cannot read {str(path)!r} as JSON {{site: node id}}: {exc}") from exc
    SiteBinding(registry)  # one node per site
    return registry
