"""Compressed updates (run config ``update-compression``).

A site sends its update u = trained - received (per tensor) instead of the trained tensor,
encoded as
  none   float32 trained tensors, as without compression (nothing here runs)
  fp16   u in float16                                                     (2 bytes per value)
  int8   q = round(u / s) in int8, one float32 scale per row               (1 byte per value)
         s = max|u_row| / 127 (rows = first dimension; a 1-D tensor is one row)
What rounding loses stays at the site and is added to the next round's update (error feedback,
``ErrorFeedback``), so nothing is lost for good, only late. The server decodes, checks and adds
the received global tensor back before validation and aggregation (``decode``).

Privacy: under DP the trained tensors are already the output of the private mechanism; the
update, its compression and the residual are functions of them and of the public global model
only: post-processing, charged nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

METHODS = ("none", "fp16", "int8")
SCALE = ".__int8_scale__"  # key suffix of a tensor's row scales in an int8 payload


class MalformedPayload(ValueError):
    """A compressed update that cannot be decoded against the global model."""


def encode(update: Mapping[str, np.ndarray], method: str) -> dict[str, np.ndarray]:
    """Wire arrays of ``update`` (float32 per tensor) under ``method`` (fp16 or int8)."""
    if method == "fp16":
        return {key: u.astype(np.float16) for key, u in update.items()}
    if method == "int8":
        payload = {}
        for key, u in update.items():
            rows = u.reshape(len(u), -1) if u.ndim > 1 else u.reshape(1, -1)
            scale = (np.abs(rows).max(axis=1) / 127.0).astype(np.float32)
            safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
            payload[key] = np.clip(np.rint(rows / safe[:, None]), -127, 127).astype(np.int8).reshape(u.shape)
            payload[key + SCALE] = scale
        return payload
    raise ValueError(f"update-compression must be fp16 or int8 here, got {method!r}")


def decode(payload: Mapping[str, np.ndarray], method: str, global_arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The trained tensors a payload stands for: global + decoded update, in the global dtype.
    Raises MalformedPayload for an unknown tensor, a wrong dtype or shape, a missing or bad scale."""
    tensors = {k: v for k, v in payload.items() if not k.endswith(SCALE)}
    scales = {k[: -len(SCALE)]: v for k, v in payload.items() if k.endswith(SCALE)}
    if method == "int8" and set(scales) != set(tensors):
        raise MalformedPayload(f"int8 scales for {sorted(set(scales) ^ set(tensors))[:3]} do not match the tensors")
    if method == "fp16" and scales:
        raise MalformedPayload("an fp16 payload has no scales")
    wanted = np.float16 if method == "fp16" else np.int8
    trained = {}
    for key, value in tensors.items():
        reference = global_arrays.get(key)
        if reference is None:
            raise MalformedPayload(f"unknown tensor '{key}'")
        if value.dtype != wanted or value.shape != reference.shape:
            raise MalformedPayload(f"tensor '{key}' is {value.dtype}{list(value.shape)}, expected "
                                   f"{np.dtype(wanted)}{list(reference.shape)}")
        if method == "fp16":
            update = value.astype(np.float32)
        else:
            rows = len(reference) if reference.ndim > 1 else 1
            scale = scales[key]
            if scale.dtype != np.float32 or scale.shape != (rows,) or not np.all(np.isfinite(scale)) or np.any(scale < 0):
                raise MalformedPayload(f"tensor '{key}': int8 scales must be {rows} finite float32 values >= 0, "
                                       f"got {scale.dtype}{list(scale.shape)}")
            update = (value.reshape(rows, -1).astype(np.float32) * scale[:, None]).reshape(reference.shape)
        trained[key] = (reference + update).astype(reference.dtype)
    return trained


class ErrorFeedback:
    """The part of each tensor's update a site could not send yet (one per site, in its node state)."""

    def __init__(self, residual: Mapping[str, np.ndarray] | None = None) -> None:
        self.residual = dict(residual or {})

    def compress(self, trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray],
                 method: str) -> dict[str, np.ndarray]:
        """Payload of (trained - received) plus what is owed; what this payload misses is owed next."""
        owed = {k: (trained[k] - received[k]).astype(np.float32) + self.residual.get(k, 0.0) for k in trained}
        payload = encode(owed, method)
        sent = decode(payload, method, {k: np.zeros_like(v) for k, v in owed.items()})
        # tensors not in this reply (an expert not trained this round) keep what they are owed
        self.residual.update({k: owed[k] - sent[k] for k in owed})
        return payload
