"""Sparse downlink: a site keeps the last global model it received, and the server sends it only
the tensors that changed since the version the site holds.

Versions: the global model after round r has version r (the initial model: the round the run
starts after). The server records, per tensor, the version at which it last changed and, per
node, the newest version that node reported holding in a reply. A message to a node known to hold
version b carries the tensors changed after b (``base-version`` b); a node with no known
version gets the whole model (``base-version`` -1).

A site holding version c >= b merges the message into its copy: a tensor unchanged since b is
unchanged since c, and every tensor changed since b is in the message. A site with no copy, or
c < b (it lost its node state), cannot; it answers ``model-cache-miss`` and the server forgets its
version, so its next message carries the whole model.

Compressed downlink (run config ``downlink-compression=fp16|int8|int4``, ``CompressedBroadcast``): the
sites then hold B, the broadcast model, rather than the global model G. When G reaches version v,
every tensor that changed moves B by the compressed difference (fedmoe.federation.compression):
B_v = B_prev + decode(encode(G_v - B_prev)); what rounding loses stays in G - B and goes out with
the tensor's next change. A node holding B_prev (``base-version`` = prev) gets that compressed
step (``downlink-encoding`` = the method); any other node gets the tensors of B_v it lacks in
float32 (encoding ``none``). Both ends compute B with the same decode, so they agree to the bit; a
site holding another version than a compressed step's base answers ``model-cache-miss``. The
global model is public to the sites: compressing it costs no privacy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from .compression import decode, encode

WHOLE_MODEL = -1


class ModelVersions:
    """Server side: which tensors changed when, and which version each node holds.

    ``derivable``: a version every site can rebuild without receiving it (the initial model, built
    from the run config: run config ``derive-initial-model``), assumed for nodes never heard from;
    a node that missed is sent the whole model instead.
    """

    def __init__(self, version: int, derivable: int | None = None) -> None:
        self.version = version
        self.derivable = derivable
        self.changed_at: dict[str, int] = {}  # tensor -> version of its last change (absent: initial)
        self.node_version: dict[int, int] = {}

    def record_update(self, old: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray], version: int) -> list[str]:
        """The global model became ``new`` (version ``version``); returns the tensors that changed."""
        changed = [k for k, v in new.items() if k not in old or not (v is old[k] or np.array_equal(v, old[k]))]
        self.changed_at.update(dict.fromkeys(changed, version))
        self.version = version
        return changed

    def delta(self, node: int, keys: Iterable[str]) -> tuple[int, list[str]]:
        """(base version, tensors to send) for a message to ``node``."""
        base = self.node_version.get(node, WHOLE_MODEL if self.derivable is None else self.derivable)
        if base == WHOLE_MODEL:
            return WHOLE_MODEL, list(keys)
        return base, [k for k in keys if self.changed_at.get(k, WHOLE_MODEL) > base]

    def heard_from(self, node: int, version: int) -> None:
        if version <= self.version:
            self.node_version[node] = max(version, self.node_version.get(node, WHOLE_MODEL))

    def forget(self, node: int) -> None:
        self.node_version[node] = WHOLE_MODEL


class CompressedBroadcast:
    """Server side of a compressed downlink: the model the sites hold and the step to it."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.model: dict[str, np.ndarray] | None = None  # B
        self.version = WHOLE_MODEL
        self.previous_version = WHOLE_MODEL
        self.step: dict[str, np.ndarray] = {}  # compressed B_prev -> B_version, by tensor

    def stale(self, versions: ModelVersions) -> bool:
        return self.model is None or versions.version != self.version

    def advance(self, global_arrays: Mapping[str, np.ndarray], versions: ModelVersions) -> None:
        """Bring B to the global model's version (the first call: B is the global model)."""
        if self.model is None:
            self.model = {k: np.array(v) for k, v in global_arrays.items()}
            self.version = versions.version
            return
        changed = [k for k, at in versions.changed_at.items() if at > self.version]
        self.step = encode({k: (global_arrays[k] - self.model[k]).astype(np.float32) for k in changed}, self.method)
        self.model.update(decode(self.step, self.method, {k: self.model[k] for k in changed}))
        self.previous_version, self.version = self.version, versions.version

    def message(self, base: int, keys: list[str]) -> tuple[dict[str, np.ndarray], str]:
        """(arrays, encoding) for a node holding version ``base`` that lacks ``keys``."""
        if base != WHOLE_MODEL and base == self.previous_version:
            return self.step, self.method
        return {k: self.model[k] for k in keys}, "none"


class CacheMiss(Exception):
    """The site cannot complete a sparse message: it holds no copy, or one older than the base."""

    def __init__(self, held: int, base: int) -> None:
        super().__init__(f"holds model version {held}, the message completes version {base} onwards")
        self.held = held


def complete(received: Mapping, base: int, cached: Mapping | None, cached_version: int, encoding: str = "none"):
    """Client side: the whole model from a message's tensors and the site's cached copy; a
    compressed step (``encoding`` fp16, int8 or int4) applies to exactly the version it starts from."""
    if base == WHOLE_MODEL:
        return dict(received)
    if cached is None or cached_version < base or (encoding != "none" and cached_version != base):
        raise CacheMiss(cached_version if cached is not None else WHOLE_MODEL, base)
    if encoding != "none":
        received = decode(received, encoding, {k: cached[k] for k in received if k in cached})
    return {**cached, **received}
