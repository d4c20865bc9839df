"""The message schema between clients/ and server/: record names, metric keys, packing and
validation of train replies. The only module of the library that imports Flower.

A train reply is RecordDict{"arrays": ArrayRecord, "metrics": MetricRecord} where the arrays
hold exactly the tensors the site trained (every shared tensor plus the tensors of its active
experts; with update-compression, their compressed updates packed in one array,
fedmoe.federation.compression) and the metrics hold:
  num-examples    int > 0, local training examples
  partition-id    int, the site
  active-experts  list[int], global expert ids (layer * num_experts + expert) it trained
  expert-counts   list[float] of length layers * num_experts, tokens routed per expert (>= 0)
  train-loss      float, mean training loss (dp=false only: under DP it is computed on private
                  examples and charged to nothing, so it stays at the site)
  bytes           int, size of the ArrayRecord the site sent (the server measures what it received)
  epsilon         float, the site's epsilon so far (dp only; with a "privacy" ConfigRecord
                  holding its ledger as JSON)
  model-version   int, the version of the global model the site now holds (fedmoe.federation.downlink)
A site whose privacy budget would be exceeded replies RecordDict{"status": ConfigRecord} with
status "budget-exhausted" instead, and a site that cannot complete a sparse downlink message
status "model-cache-miss". The server sends ConfigRecord{"server-round", "run-dir",
"model-version", "base-version"} with the tensors changed since base-version (-1: all).

Every field a site sends has a release class (``RELEASES``): why sending it is compatible with
the site's differential privacy. The ClientApp checks each reply against it before it leaves
(``release_violations``): an unclassified field, or a not-private one under DP, is never sent.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from . import compression as codec

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
PRIVACY = "privacy"
STATUS = "status"
RUN_DIR = "run-dir"
BUDGET_EXHAUSTED = "budget-exhausted"
MODEL_CACHE_MISS = "model-cache-miss"
MODEL_VERSION = "model-version"
BASE_VERSION = "base-version"
DOWNLINK_ENCODING = "downlink-encoding"  # fedmoe.federation.downlink: none, or the compressed step's method
INITIAL_MODEL = "initial-model-sha256"  # fedmoe.federation.downlink: the digest of the derivable initial model

NUM_EXAMPLES = "num-examples"
SITE = "partition-id"
ACTIVE_EXPERTS = "active-experts"
EXPERT_COUNTS = "expert-counts"
TRAIN_LOSS = "train-loss"
SENT_BYTES = "bytes"
EPSILON = "epsilon"

_EXPERT_KEY = re.compile(r"^moe_layers\.(\d+)\.experts\.[a-z_]+?_(\d+)$")
_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER = re.compile(rb"'descr': '([^']+)', 'fortran_order': False, 'shape': \(([\d, ]*)\)")


class InvalidReply(ValueError):
    """A reply that must not be aggregated; the message says why."""


class ModelCacheMiss(Exception):
    """The site could not complete a sparse downlink message; it needs the whole model."""

    def __init__(self, site: int, held: int) -> None:
        super().__init__(f"site {site} holds model version {held}: cannot complete a sparse downlink message")
        self.site, self.held = site, held


class BudgetExhausted(Exception):
    """The site did not train: its next round would exceed its privacy budget."""

    def __init__(self, site: int, epsilon: float) -> None:
        super().__init__(f"site {site} stopped at epsilon {epsilon:.3f}: privacy budget exhausted")
        self.site, self.epsilon = site, epsilon


@lru_cache(maxsize=65536)
def expert_id(key: str, num_experts: int) -> int | None:
    """Global expert id of a parameter name, or None for shared (trunk, router, head) tensors."""
    match = _EXPERT_KEY.match(key)
    if match is None:
        return None
    return int(match.group(1)) * num_experts + int(match.group(2))


def to_record(state: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    with warnings.catch_warnings():
        # arrays decoded from a message are read-only views of its bytes; the tensors made from
        # them are only serialised again, never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return ArrayRecord({k: torch.as_tensor(v) for k, v in state.items()})


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: array_to_numpy(v) for k, v in record.items()}


def array_to_numpy(array) -> np.ndarray:
    """Flower ``Array.numpy()`` (a .npy payload) without ``np.load``'s header parser, whose
    ast.literal_eval per tensor dominated aggregation time: a C-order header is matched by a
    regular expression and the data viewed read-only; anything else goes through np.load."""
    data = array.data
    if data[:6] == _NPY_MAGIC and data[6] in (1, 2, 3):
        size_bytes = 2 if data[6] == 1 else 4
        start = 8 + size_bytes + int.from_bytes(data[8 : 8 + size_bytes], "little")
        layout = _npy_layout(bytes(data[8 + size_bytes : start]))
        if layout is not None and len(data) - start == layout[2]:
            return np.frombuffer(data, dtype=layout[0], offset=start).reshape(layout[1])
    return array.numpy()


@lru_cache(maxsize=4096)
def _npy_layout(header: bytes) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """(dtype, shape, payload bytes) of a C-order numeric .npy header, else None (tensors of
    one model repeat a handful of headers, hence the cache)."""
    match = _NPY_HEADER.search(header)
    if match is None:
        return None
    dtype = np.dtype(match.group(1).decode())
    shape = tuple(int(d) for d in match.group(2).split(b",") if d.strip())
    return (dtype, shape, dtype.itemsize * int(np.prod(shape))) if dtype.kind in "biuf" else None


def to_state_dict(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


@dataclass
class TrainReply:
    site: int
    num_examples: int
    arrays: dict[str, np.ndarray]
    active_experts: list[int]
    expert_counts: np.ndarray
    train_loss: float | None  # None: not sent (always under DP)
    nbytes: int  # bytes of the ArrayRecord as received
    epsilon: float | None = None
    ledger_json: str | None = None
    update_norm: float = 0.0  # L2 norm of (sent tensors - global ones)


def encode_train_reply(
    trained: Mapping[str, torch.Tensor], site: int, num_examples: int,
    active_experts: list[int], expert_counts: np.ndarray, train_loss: float | None, ledger=None,
) -> RecordDict:
    metrics = MetricRecord({
        NUM_EXAMPLES: int(num_examples),
        SITE: int(site),
        ACTIVE_EXPERTS: [int(e) for e in active_experts],
        EXPERT_COUNTS: [float(c) for c in expert_counts],
    })
    if train_loss is not None:
        metrics[TRAIN_LOSS] = float(train_loss)
    arrays = to_record(trained)
    metrics[SENT_BYTES] = arrays.count_bytes()
    content = RecordDict({ARRAYS: arrays, METRICS: metrics})
    if ledger is not None:
        metrics[EPSILON] = float(ledger.epsilon())
        content[PRIVACY] = ConfigRecord({"ledger": ledger.to_json()})
    return content


def encode_budget_exhausted(site: int, epsilon: float, projected: float) -> RecordDict:
    return RecordDict({STATUS: ConfigRecord({
        STATUS: BUDGET_EXHAUSTED, SITE: int(site), EPSILON: float(epsilon), "projected-epsilon": float(projected),
    })})


def encode_model_cache_miss(site: int, held: int) -> RecordDict:
    return RecordDict({STATUS: ConfigRecord({STATUS: MODEL_CACHE_MISS, SITE: int(site), MODEL_VERSION: int(held)})})


def stamp_model_version(content: RecordDict, version: int) -> RecordDict:
    """Add the model version the site holds to its reply (metrics, or the status record)."""
    record = content.metric_records.get(METRICS) or content.config_records.get(STATUS)
    record[MODEL_VERSION] = int(version)
    return content


def held_model_version(content: RecordDict) -> int | None:
    """The model version a reply says its site holds, if it says one."""
    for record in (content.metric_records.get(METRICS), content.config_records.get(STATUS)):
        if record is not None and isinstance(record.get(MODEL_VERSION), int):
            return int(record[MODEL_VERSION])
    return None


def raise_for_status(content: RecordDict) -> None:
    """Raise BudgetExhausted or ModelCacheMiss for a site that replied with that status."""
    status = content.config_records.get(STATUS)
    if status is None:
        return
    if status.get(STATUS) == BUDGET_EXHAUSTED:
        raise BudgetExhausted(int(status.get(SITE, -1)), float(status.get(EPSILON, float("nan"))))
    if status.get(STATUS) == MODEL_CACHE_MISS:
        raise ModelCacheMiss(int(status.get(SITE, -1)), int(status.get(MODEL_VERSION, -1)))


def decode_train_reply(
    content: RecordDict, global_arrays: Mapping[str, np.ndarray], num_experts: int, max_update_norm: float = 0.0,
    personal: frozenset[str] = frozenset(), compression: str = "none", frozen: frozenset[str] = frozenset(),
) -> TrainReply:
    """Parse and validate a train reply against the current global model; raise InvalidReply
    (or BudgetExhausted / ModelCacheMiss for a site that did not train). With max_update_norm > 0,
    a reply whose update (all its tensors minus the global ones) has a larger L2 norm is invalid.
    Tensors in ``personal`` (fedmoe.federation.personalization) stay at the sites and tensors in ``frozen`` (the
    model's frozen_parameters, e.g. the base weights under LoRA) are trained by no one: a reply
    carrying one is invalid.
    With ``compression`` fp16, int8 or int4 the tensors are compressed updates (fedmoe.federation.compression),
    decoded against the global model first; every check then applies to the decoded tensors."""
    raise_for_status(content)
    if ARRAYS not in content.array_records or METRICS not in content.metric_records:
        raise InvalidReply(f"reply lacks the '{ARRAYS}' ArrayRecord or the '{METRICS}' MetricRecord")
    metrics = content.metric_records[METRICS]
    for key in (NUM_EXAMPLES, SITE, ACTIVE_EXPERTS, EXPERT_COUNTS):
        if key not in metrics:
            raise InvalidReply(f"metric '{key}' missing")
    expert_ids = {expert_id(k, num_experts) for k in global_arrays} - {None}
    total_experts = 1 + max(expert_ids)

    num_examples = metrics[NUM_EXAMPLES]
    if not isinstance(num_examples, int) or num_examples <= 0:
        raise InvalidReply(f"'{NUM_EXAMPLES}' must be a positive int, got {num_examples!r}")
    active = metrics[ACTIVE_EXPERTS]
    if not isinstance(active, list) or not all(isinstance(e, int) for e in active):
        raise InvalidReply(f"'{ACTIVE_EXPERTS}' must be a list of ints")
    if len(set(active)) != len(active) or any(not 0 <= e < total_experts for e in active):
        raise InvalidReply(f"'{ACTIVE_EXPERTS}' {active} has duplicates or ids outside [0, {total_experts})")
    counts = np.asarray(metrics[EXPERT_COUNTS], dtype=np.float64)
    if counts.shape != (total_experts,) or not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise InvalidReply(f"'{EXPERT_COUNTS}' must be {total_experts} finite counts >= 0")

    record = content.array_records[ARRAYS]
    active_set = set(active)
    expected = {k for k in global_arrays if expert_id(k, num_experts) in active_set | {None}} - personal - frozen
    if compression == "none":
        received = {key: array_to_numpy(array) for key, array in record.items()}
    else:
        # the packed payload's layout follows from the tensors the reply must carry
        if list(record) != [codec.PACKED]:
            raise InvalidReply(f"compressed update ({compression}): one array '{codec.PACKED}' expected, got {sorted(record)[:3]}")
        try:
            payload = codec.unpack(array_to_numpy(record[codec.PACKED]), compression, expected, global_arrays)
            received = codec.decode(payload, compression, global_arrays)
        except codec.MalformedPayload as exc:
            raise InvalidReply(f"compressed update ({compression}): {exc}") from exc
    arrays: dict[str, np.ndarray] = {}
    for key, value in received.items():
        if key not in global_arrays:
            raise InvalidReply(f"unknown tensor '{key}'")
        if key in personal:
            raise InvalidReply(f"tensor '{key}' is a personal part (personalize): sites keep it")
        if key in frozen:
            raise InvalidReply(f"tensor '{key}' is frozen (adapter): no site trains it")
        reference = global_arrays[key]
        if value.shape != reference.shape or value.dtype != reference.dtype:
            raise InvalidReply(
                f"tensor '{key}' is {value.dtype}{list(value.shape)}, expected {reference.dtype}{list(reference.shape)}"
            )
        if not np.all(np.isfinite(value)):
            raise InvalidReply(f"tensor '{key}' has NaN or Inf")
        arrays[key] = value

    if set(arrays) != expected:
        missing = sorted(expected - set(arrays))[:3]
        extra = sorted(set(arrays) - expected)[:3]
        raise InvalidReply(
            f"tensors do not match the active experts {active}: missing {missing}, not active {extra}"
        )
    norm = update_norm(arrays, global_arrays)
    if max_update_norm > 0 and norm > max_update_norm:
        raise InvalidReply(f"update norm {norm:.4g} exceeds max-update-norm {max_update_norm:g}")
    train_loss = metrics.get(TRAIN_LOSS)
    if train_loss is not None and not np.isfinite(train_loss):
        raise InvalidReply(f"'{TRAIN_LOSS}' must be finite, got {train_loss}")
    epsilon, ledger_json = None, None
    if EPSILON in metrics:
        epsilon = float(metrics[EPSILON])
        if not epsilon >= 0:
            raise InvalidReply(f"'{EPSILON}' must be >= 0, got {epsilon}")
        ledger_json = str(content.config_records[PRIVACY]["ledger"]) if PRIVACY in content.config_records else None
    return TrainReply(
        site=int(metrics[SITE]), num_examples=num_examples, arrays=arrays, active_experts=list(active),
        expert_counts=counts, train_loss=None if train_loss is None else float(train_loss), nbytes=record.count_bytes(),
        epsilon=epsilon, ledger_json=ledger_json, update_norm=norm,
    )


def update_norm(arrays: Mapping[str, np.ndarray], global_arrays: Mapping[str, np.ndarray]) -> float:
    """L2 norm of (arrays - global) over every tensor in ``arrays``."""
    # np.square + sum rather than a BLAS dot: a multi-threaded BLAS on busy cores was 30x slower
    total = sum(float(np.square(value - global_arrays[key], dtype=np.float64).sum()) for key, value in arrays.items())
    return float(np.sqrt(total))


EVAL_ACCURACY = "accuracy"
EVAL_LOSS = "loss"
BITS_PER_CHAR = "bits-per-char"  # charlm only


@dataclass
class EvaluateReply:
    site: int
    num_examples: int
    accuracy: float
    loss: float
    bits_per_char: float | None = None


def encode_evaluate_reply(site: int, num_examples: int, accuracy: float, loss: float,
                          bits_per_char: float | None = None) -> RecordDict:
    metrics = MetricRecord({
        NUM_EXAMPLES: int(num_examples), SITE: int(site),
        EVAL_ACCURACY: float(accuracy), EVAL_LOSS: float(loss),
    })
    if bits_per_char is not None:
        metrics[BITS_PER_CHAR] = float(bits_per_char)
    return RecordDict({METRICS: metrics})


def decode_evaluate_reply(content: RecordDict) -> EvaluateReply:
    """An evaluate reply's metrics; raise InvalidReply (or ModelCacheMiss)."""
    raise_for_status(content)
    metrics = content.metric_records.get(METRICS)
    if metrics is None or any(k not in metrics for k in (NUM_EXAMPLES, SITE, EVAL_ACCURACY, EVAL_LOSS)):
        raise InvalidReply("evaluate reply lacks metrics")
    n, acc, loss = metrics[NUM_EXAMPLES], float(metrics[EVAL_ACCURACY]), float(metrics[EVAL_LOSS])
    if not isinstance(n, int) or n <= 0 or not 0.0 <= acc <= 1.0 or not np.isfinite(loss):
        raise InvalidReply(f"evaluate metrics out of range: n={n} accuracy={acc} loss={loss}")
    bits = metrics.get(BITS_PER_CHAR)
    if bits is not None and not (np.isfinite(bits) and bits >= 0):
        raise InvalidReply(f"'{BITS_PER_CHAR}' must be finite and >= 0, got {bits}")
    return EvaluateReply(int(metrics[SITE]), n, acc, loss, None if bits is None else float(bits))


# --- what a site sends, and why it may send it --------------------------------------------------

CHARGED = "charged"  # the output of a mechanism charged to the site's privacy ledger
POST_PROCESSING = "post-processing"  # computed only from charged values and public ones
PUBLIC = "public"  # independent of the site's private examples (or public by assumption)
NOT_PRIVATE = "not private"  # depends on private examples, charged to nothing


@dataclass(frozen=True)
class Release:
    """The release class of one reply field, why, and for a not-private field the run-config
    key that lets it out under DP (None: never under DP)."""

    kind: str
    why: str
    opt_in: str | None = None


ANY_TENSOR = "*"
RELEASES: dict[tuple[str, str], Release] = {
    (ARRAYS, ANY_TENSOR): Release(CHARGED, "DP-SGD output: shared tensors and active experts, trained on clipped, noised gradients "
                                           "(with update-compression: their difference to the public global model, compressed: post-processing)"),
    (METRICS, EXPERT_COUNTS): Release(CHARGED, "routing counts through the Gaussian mechanism (count-noise-multiplier), charged per round"),
    (METRICS, ACTIVE_EXPERTS): Release(POST_PROCESSING, "chosen from the noised counts"),
    (METRICS, SENT_BYTES): Release(POST_PROCESSING, "size of the tensors of the shared part and the active experts"),
    (METRICS, NUM_EXAMPLES): Release(PUBLIC, "size of the site's training (or test) split: public by assumption, as the sample rate in every DP-SGD analysis"),
    (METRICS, SITE): Release(PUBLIC, "the site's partition id"),
    (METRICS, EPSILON): Release(PUBLIC, "function of the ledger history (noise multipliers, sample rate, steps)"),
    (METRICS, MODEL_VERSION): Release(PUBLIC, "version of the global model the site holds"),
    (PRIVACY, "ledger"): Release(PUBLIC, "the ledger: configuration, dataset size, history, per-round epsilon"),
    (STATUS, STATUS): Release(PUBLIC, "budget-exhausted (decided by the ledger) or model-cache-miss"),
    (STATUS, SITE): Release(PUBLIC, "the site's partition id"),
    (STATUS, EPSILON): Release(PUBLIC, "function of the ledger history"),
    (STATUS, "projected-epsilon"): Release(PUBLIC, "function of the ledger history and the planned round"),
    (STATUS, MODEL_VERSION): Release(PUBLIC, "version of the global model the site holds"),
    (METRICS, TRAIN_LOSS): Release(NOT_PRIVATE, "loss on private training examples; sent only with dp=false"),
    (METRICS, EVAL_ACCURACY): Release(NOT_PRIVATE, "accuracy on the site's private test split", "dp-site-evaluation"),
    (METRICS, EVAL_LOSS): Release(NOT_PRIVATE, "loss on the site's private test split", "dp-site-evaluation"),
    (METRICS, BITS_PER_CHAR): Release(NOT_PRIVATE, "bits per character on the site's private test split", "dp-site-evaluation"),
}


def release_of(record: str, key: str, is_arrays: bool) -> Release | None:
    return RELEASES.get((record, ANY_TENSOR if is_arrays else key))


def release_violations(content: RecordDict, dp: bool, opted_in: frozenset[str] = frozenset()) -> list[str]:
    """Why ``content`` must not leave a site: fields with no release class, and under DP
    not-private fields whose opt-in key is not in ``opted_in``. Empty when it may be sent."""
    problems = []
    for name, record in content.items():
        for key in record.keys():
            release = release_of(name, key, isinstance(record, ArrayRecord))
            if release is None:
                problems.append(f"'{name}/{key}' has no release class (fedmoe.federation.wire.RELEASES)")
            elif dp and release.kind == NOT_PRIVATE and release.opt_in not in opted_in:
                allowed = f" unless {release.opt_in}=true" if release.opt_in else ""
                problems.append(f"'{name}/{key}' is not private ({release.why}) and is not sent under DP{allowed}")
    return problems
