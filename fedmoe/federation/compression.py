"""Compressed updates (run config ``update-compression``).

A site sends its update u = trained - received (per tensor) instead of the trained tensor,
encoded as
  none   float32 trained tensors, as without compression (nothing here runs)
  fp16   u in float16                                                     (2 bytes per value)
  int8   q = round(u / s) in int8, one float32 scale per row               (1 byte per value)
         s = max|u_row| / 127 (rows = first dimension; a 1-D tensor is one row)
  int4   q = round(u / s) in [-7, 7], s = max|u_row| / 7, stored as q + 8 in  (1/2 byte per value)
         4 bits, two per byte along the row (an odd row's last byte pads with 8)
What rounding loses stays at the site and is added to the next round's update (error feedback,
``ErrorFeedback``), so nothing is lost for good, only late. The server decodes, checks and adds
the received global tensor back before validation and aggregation (``decode``).

On the wire (``pack``) a reply's payload is one uint8 array: the deflate (zlib) stream of the bytes
of every code and scale array, tensor by tensor in key order. One array instead of two per tensor
saves a .npy header and a name per array (on the default model's 18 tensors, more than the int8
codes' scales weigh), and deflate takes what the codes' skew allows (measured: a few percent
of a noised update's int8 codes, more of packed int4 ones). The server knows which tensors a reply carries (the shared ones and those of the
experts it names active), hence every array's dtype and shape (``layout``), and refuses a stream
that does not inflate to exactly that many bytes (``unpack``).

Privacy: under DP the trained tensors are already the output of the private mechanism; the
update, its compression and the residual are functions of them and of the public global model
only: post-processing, charged nothing (the packed stream's length included).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

METHODS = ("none", "fp16", "int8", "int4")
LEVELS = {"int8": 127, "int4": 7}  # largest |q| of each integer code
SCALE = ".__row_scale__"  # key suffix of a tensor's row scales in an integer payload
PACKED = "packed-update"  # the one array of a compressed reply on the wire


class MalformedPayload(ValueError):
    """A compressed update that cannot be decoded against the global model."""


def encode(update: Mapping[str, np.ndarray], method: str) -> dict[str, np.ndarray]:
    """Wire arrays of ``update`` (float32 per tensor) under ``method`` (fp16, int8 or int4)."""
    if method == "fp16":
        return {key: u.astype(np.float16) for key, u in update.items()}
    if method not in LEVELS:
        raise ValueError(f"update-compression must be one of {', '.join(METHODS[1:])} here, got {method!r}")
    levels = LEVELS[method]
    payload = {}
    for key, u in update.items():
        rows = _rows(u)
        scale = (np.abs(rows).max(axis=1) / levels).astype(np.float32)
        safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(rows / safe[:, None]), -levels, levels)
        payload[key] = q.astype(np.int8).reshape(u.shape) if method == "int8" else _pack_nibbles(q)
        payload[key + SCALE] = scale
    return payload


def _rows(array: np.ndarray) -> np.ndarray:
    """[rows, values per row] view: the first dimension is the rows; a 1-D tensor is one row."""
    return array.reshape(len(array), -1) if array.ndim > 1 else array.reshape(1, -1)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 [rows, ceil(n / 2)] from integers q in [-7, 7] of shape [rows, n]: q + 8, low nibble first."""
    nibbles = (q + 8).astype(np.uint8)
    if nibbles.shape[1] % 2:
        nibbles = np.pad(nibbles, ((0, 0), (0, 1)), constant_values=8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def _unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """float32 [rows, n] integers in [-8, 7] from ``_pack_nibbles``' bytes."""
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=2).reshape(len(packed), -1)[:, :n]
    return nibbles.astype(np.float32) - 8


def _code_layout(reference: np.ndarray, method: str) -> tuple[np.dtype, tuple[int, ...]]:
    """(dtype, shape) of the codes of a tensor shaped like ``reference``."""
    if method == "fp16":
        return np.dtype(np.float16), reference.shape
    if method == "int8":
        return np.dtype(np.int8), reference.shape
    rows = _rows(reference)
    return np.dtype(np.uint8), (len(rows), (rows.shape[1] + 1) // 2)


def layout(method: str, keys: Iterable[str], global_arrays: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of each array of the payload for tensors ``keys``, in packing order."""
    for key in sorted(keys):
        yield key, *_code_layout(global_arrays[key], method)
        if method in LEVELS:
            yield key + SCALE, np.dtype(np.float32), (len(_rows(global_arrays[key])),)


def pack(payload: Mapping[str, np.ndarray]) -> np.ndarray:
    """uint8 [n]: the deflate stream of the payload's arrays' bytes in ``layout`` order."""
    order = sorted(payload, key=lambda name: (name.removesuffix(SCALE), name.endswith(SCALE)))
    raw = b"".join(np.ascontiguousarray(payload[name]).tobytes() for name in order)
    return np.frombuffer(zlib.compress(raw, 9), dtype=np.uint8)


def unpack(packed: np.ndarray, method: str, keys: Iterable[str], global_arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The payload a ``pack`` stream holds for tensors ``keys``. Inflates at most the expected
    number of bytes; raises MalformedPayload for anything but a deflate stream of exactly that many."""
    parts = list(layout(method, keys, global_arrays))
    expected = sum(dtype.itemsize * int(np.prod(shape)) for _, dtype, shape in parts)
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise MalformedPayload(f"'{PACKED}' must be uint8[n], got {packed.dtype}{list(packed.shape)}")
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(packed.tobytes(), expected)
    except zlib.error as exc:
        raise MalformedPayload(f"'{PACKED}' is not a deflate stream: {exc}") from exc
    what = f"the {len(parts)} arrays of its {sum(1 for name, _, _ in parts if not name.endswith(SCALE))} tensors take {expected}"
    if inflater.unconsumed_tail or inflater.unused_data:
        raise MalformedPayload(f"'{PACKED}' holds more than {expected} bytes, where {what}")
    if not inflater.eof:
        raise MalformedPayload(f"'{PACKED}' is cut short: its deflate stream stops after {len(raw)} bytes, unfinished")
    if len(raw) != expected:
        raise MalformedPayload(f"'{PACKED}' holds {len(raw)} bytes where {what}")
    payload, offset = {}, 0
    for name, dtype, shape in parts:
        count = int(np.prod(shape))
        payload[name] = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape)
        offset += count * dtype.itemsize
    return payload


def decode(payload: Mapping[str, np.ndarray], method: str, global_arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The trained tensors a payload stands for: global + decoded update, in the global dtype.
    Raises MalformedPayload for an unknown tensor, a wrong dtype or shape, a missing or bad scale."""
    tensors = {k: v for k, v in payload.items() if not k.endswith(SCALE)}
    scales = {k[: -len(SCALE)]: v for k, v in payload.items() if k.endswith(SCALE)}
    if method in LEVELS and set(scales) != set(tensors):
        raise MalformedPayload(f"{method} scales for {sorted(set(scales) ^ set(tensors))[:3]} do not match the tensors")
    if method == "fp16" and scales:
        raise MalformedPayload("an fp16 payload has no scales")
    trained = {}
    for key, value in tensors.items():
        reference = global_arrays.get(key)
        if reference is None:
            raise MalformedPayload(f"unknown tensor '{key}'")
        rows = _rows(reference)
        wanted, shape = _code_layout(reference, method)
        if value.dtype != wanted or value.shape != shape:
            raise MalformedPayload(f"tensor '{key}' is {value.dtype}{list(value.shape)}, expected "
                                   f"{wanted}{list(shape)}")
        if method == "fp16":
            update = value.astype(np.float32)
        else:
            scale = scales[key]
            if scale.dtype != np.float32 or scale.shape != (len(rows),) or not np.all(np.isfinite(scale)) or np.any(scale < 0):
                raise MalformedPayload(f"tensor '{key}': {method} scales must be {len(rows)} finite float32 values "
                                       f">= 0, got {scale.dtype}{list(scale.shape)}")
            q = _rows(value).astype(np.float32) if method == "int8" else _unpack_nibbles(value, rows.shape[1])
            update = (q * scale[:, None]).reshape(reference.shape)
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
