"""The wire form of stage 1's partials (the internal ``coalmine.partials`` topic): MessagePack
with every summary array as its raw little-endian bytes, so stage 2 reads a partial without
parsing a number at a time (JSON lists of bin counts cost more to parse than to merge). A
summary of a few events (a low-traffic model's bucket in one partition) sends only its occupied
bins and its scalars that are not 0: at 10 events/s a model in 6 partitions, 416 bytes an event
instead of 5,806.

>>> import numpy as np
>>> partial = {"model": "m", "source": 2, "closed_through": 1000,
...            "buckets": {"0": {"champion": {"n": 3, "counts": np.array([1, 2]),
...                                           "sums": np.array([0.5, 4.0])}}}}
>>> [back] = [decode_partial(raw) for raw in encode_partial(partial)]
>>> np.frombuffer(back["buckets"]["0"]["champion"]["counts"], "<i8").tolist()
[1, 2]
>>> one = {"n": 1, "counts": np.eye(1, 200, 7, dtype=np.int64)[0], "sums": np.eye(1, 200, 7)[0]}
>>> partial["buckets"]["0"]["champion"] = one   # one event in bin 7 of 200: 3,200 bytes dense
>>> [raw] = encode_partial(partial)
>>> len(raw), decode_partial(raw)["buckets"]["0"]["champion"]["counts"].nonzero()
(110, (array([7]),))
"""

from __future__ import annotations

import math
import sys
from typing import Any

import msgspec
import numpy as np


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if _LITTLE and value.dtype.isnative and value.flags.c_contiguous:
            return value.data  # the array's own bytes, not a copy (msgspec encodes any buffer)
        return _little_endian(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot encode {type(value).__name__} in a partial")


_LITTLE = sys.byteorder == "little"
_encoder = msgspec.msgpack.Encoder(enc_hook=_plain)
_decoder = msgspec.msgpack.Decoder()


#: the arrays of a summary sent sparse when mostly empty, and their type
_SPARSE = {"counts": "<i8", "sums": "<f8", "latency": "<i8"}
#: those arrays by the array whose nonzero bins they send (a bin's sum is 0 where its count is)
_SPARSE_BY = (("counts", ("counts", "sums")), ("latency", ("latency",)))
#: what a summary always sends: its arrays, events and version (any other field is a number)
_KEPT = frozenset(
    ("n", "version", "counts", "sums", "missing", "latency", "score_positives", "score_negatives")
)
#: no layout has more bins (a forged size must not allocate gigabytes)
_MAX_BINS = 1 << 24

#: a message this large is split (brokers refuse messages over 1 MB by default)
MAX_BYTES = 512 * 1024


def encode_partial(partial: dict, max_bytes: int = MAX_BYTES) -> list[bytes]:
    """A partial (:meth:`coalmine.streams.sketcher.Sketcher.close`) as messages for the topic,
    in order: one, or, when it is larger than ``max_bytes`` (a source catching up on a backlog
    closes many buckets at once), several holding consecutive buckets. Each part but the last
    says its source closed only up to the next part's first bucket, so stage 2 never evaluates
    a bucket before all of it has arrived."""
    return _split(_sparse(partial), max_bytes)


def _split(partial: dict, max_bytes: int) -> list[bytes]:
    """:func:`encode_partial` of a partial already in the sparse form (made once, not again
    at each halving)."""
    raw = _encoder.encode(partial)
    starts = sorted(partial["buckets"], key=int)
    if len(raw) <= max_bytes or len(starts) < 2:
        return [raw]
    half = len(starts) // 2
    first = {
        **partial,
        "closed_through": int(starts[half]),
        "buckets": {b: partial["buckets"][b] for b in starts[:half]},
    }
    rest = {**partial, "buckets": {b: partial["buckets"][b] for b in starts[half:]}}
    return _split(first, max_bytes) + _split(rest, max_bytes)


def _sparse(partial: dict) -> dict:
    """``partial`` with each summary of mostly empty bins in its sparse form (the module's
    docstring): a bucket of a model at 10 events/s in one of 6 partitions holds ~1 event."""
    buckets = {start: _sparse_summaries(v) for start, v in partial["buckets"].items()}
    return {**partial, "buckets": buckets}


def _sparse_summaries(summaries: dict[str, dict]) -> dict[str, dict]:
    return {name: _sparse_summary(d) for name, d in summaries.items()}


def _sparse_summary(d: dict) -> dict:
    """A summary without its zero scalars (their defaults) and with its mostly empty arrays
    as ``[size, positions, values]`` (an array given so already, as
    :meth:`~coalmine.streams.sketch.Packed.sparse_dict` gives it, is kept so). Sent for every
    (model, partition, bucket) with events: written for speed, the arrays' parts as bytes
    (what the encoder makes of an array, without a call back into Python for each)."""
    # a -0.0 is sent: the default, 0, would not give it back
    out = {k: v for k, v in d.items() if k in _KEPT or v or _copysign(1.0, v) < 0}
    for by, names in _SPARSE_BY:
        first = d.get(by)
        if first is None:
            continue
        if isinstance(first, list):
            for name in names:
                size, at, occupied = d[name]
                out[name] = [size, at.astype("<u4"), occupied]
            continue
        (at,) = first.nonzero()
        if 3 * len(at) < len(first):  # 12 bytes an occupied bin, against 8 a bin dense
            positions = at.astype("<u4").tobytes()
            for name in names:
                out[name] = [len(first), positions, _little_endian(d[name][at])]
    return out


_copysign = math.copysign


def _little_endian(values: np.ndarray) -> bytes:
    """An array's values as the wire has them: little-endian (a copy only on a big-endian
    machine)."""
    if _LITTLE and values.dtype.isnative:
        return values.tobytes()
    return values.astype(values.dtype.newbyteorder("<")).tobytes()


def decode_partial(raw: bytes) -> dict:
    """The partial back, arrays as bytes (:meth:`coalmine.streams.sketch.Summary.from_dict`
    reads them), a sparse one as a dense array."""
    return _dense_partial(_decoder.decode(raw))


def encode_partials(partials: list[dict], max_bytes: int = MAX_BYTES) -> list[bytes]:
    """Partials (of the models of one partials partition) as few messages: each a MessagePack
    array of them, in order, under ``max_bytes`` but for a part that is larger alone (each
    partial split as :func:`encode_partial` splits it). A message each would cost stage 2
    Faust's per-message path, ~75 us, a (model, partition) and close.

    >>> [raw] = encode_partials([{"model": m, "source": 0, "closed_through": 0, "buckets": {}}
    ...                          for m in ("a", "b")])
    >>> [p["model"] for p in decode_partials(raw)]
    ['a', 'b']
    """
    messages: list[bytes] = []
    held: list[bytes] = []
    size = 0
    for raw in (part for partial in partials for part in encode_partial(partial, max_bytes)):
        if held and size + len(raw) > max_bytes:
            messages.append(_array_of(held))
            held, size = [], 0
        held.append(raw)
        size += len(raw)
    return messages + [_array_of(held)] if held else messages


def _array_of(items: list[bytes]) -> bytes:
    """A MessagePack array of items already encoded (not encoded again); fewer than 65,536
    (a message's items are tens of bytes at least, and it is under a megabyte)."""
    n = len(items)
    head = bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big")
    return head + b"".join(items)


def decode_partials(raw: bytes) -> list[dict]:
    """The partials of a message of :func:`encode_partials` (or of one partial, or a
    heartbeat, alone: a list of one), as :func:`decode_partial` gives each."""
    decoded = _decoder.decode(raw)
    return [_dense_partial(p) for p in (decoded if isinstance(decoded, list) else [decoded])]


def _dense_partial(partial: dict) -> dict:
    """``partial`` with its summaries' sparse arrays dense again, in place."""
    for variants in partial.get("buckets", {}).values():
        _dense_summaries(variants)
    return partial


def _dense_summaries(summaries: dict[str, dict]) -> dict[str, dict]:
    """Summaries by name with their sparse arrays dense again, in place."""
    for d in summaries.values():
        for name in _SPARSE:
            if isinstance(d.get(name), list):
                d[name] = _dense(name, *d[name])
    return summaries


def _dense(name: str, size: int, at: bytes, values: bytes) -> np.ndarray:
    """A sparse array (:func:`_sparse_summary`) dense again; ValueError when its parts do not
    fit together (a forged or damaged message)."""
    if not 0 <= size <= _MAX_BINS:
        raise ValueError(f"a sparse {name} of {size} bins")
    dtype = _SPARSE[name]
    dense = np.zeros(size, dtype)
    try:  # numpy checks the positions' bounds and the lengths
        # as native integers (never negative: they were unsigned), indexing costs 0.3 us, not 2.6
        dense[np.frombuffer(at, "<u4").astype(np.intp)] = np.frombuffer(values, dtype)
    except (IndexError, ValueError) as exc:
        raise ValueError(f"a sparse {name} does not fit together: {exc}") from None
    return dense


def encode_summaries(summaries: dict[str, dict]) -> bytes:
    """Summaries by name, in their :meth:`~coalmine.streams.sketch.Summary.to_dict` form, in
    the partials' compact form (a bucket of stage 2's window, for its state record)."""
    return _encoder.encode(_sparse_summaries(summaries))


def decode_summaries(raw: bytes) -> dict[str, dict]:
    """:func:`encode_summaries` back, arrays dense (as bytes or arrays)."""
    return _dense_summaries(_decoder.decode(raw))


def encode_heartbeat(model: str, source: int, behind: bool) -> bytes:
    """A message for the partials topic that holds no buckets: whether stage 1 of ``source``
    has messages it has not read yet (``behind``), so that stage 2 never evaluates a window
    without a source that is catching up, however long it sends no partial.

    >>> decode_partial(encode_heartbeat("m", 2, True))
    {'model': 'm', 'source': 2, 'behind': True}
    """
    return _encoder.encode({"model": model, "source": source, "behind": behind})


def is_heartbeat(partial: dict) -> bool:
    """Whether a decoded message of the partials topic is a heartbeat (:func:`encode_heartbeat`)."""
    return "buckets" not in partial


def readable_partial(raw: bytes | None) -> list[dict]:
    """A message of the partials topic for people (``coalmine tail partials``): its partials,
    arrays as lists."""
    from coalmine.streams.sketch import Summary

    partials = decode_partials(raw or b"")
    for partial in partials:
        for variants in partial.get("buckets", {}).values():
            for variant, d in variants.items():
                version = d.pop("version", None)
                plain = {
                    k: v.tolist() if isinstance(v, np.ndarray) else v
                    for k, v in Summary.from_dict(d).to_dict().items()
                }
                variants[variant] = {**plain, "version": version}
    return partials
