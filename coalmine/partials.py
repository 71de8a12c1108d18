"""The wire form of stage 1's partials (the internal ``coalmine.partials`` topic): MessagePack
with every summary array as its raw little-endian bytes, so stage 2 reads a partial without
parsing a number at a time (JSON lists of bin counts cost more to parse than to merge).

>>> import numpy as np
>>> partial = {"model": "m", "source": 2, "closed_through": 1000,
...            "buckets": {"0": {"champion": {"n": 3, "counts": np.array([1, 2])}}}}
>>> [back] = [decode_partial(raw) for raw in encode_partial(partial)]
>>> np.frombuffer(back["buckets"]["0"]["champion"]["counts"], "<i8").tolist()
[1, 2]
"""

from __future__ import annotations

import sys
from typing import Any

import msgspec
import numpy as np


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if _LITTLE and value.dtype.isnative and value.flags.c_contiguous:
            return value.data  # the array's own bytes, not a copy (msgspec encodes any buffer)
        return np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot encode {type(value).__name__} in a partial")


_LITTLE = sys.byteorder == "little"
_encoder = msgspec.msgpack.Encoder(enc_hook=_plain)
_decoder = msgspec.msgpack.Decoder()


#: a message this large is split (brokers refuse messages over 1 MB by default)
MAX_BYTES = 512 * 1024


def encode_partial(partial: dict, max_bytes: int = MAX_BYTES) -> list[bytes]:
    """A partial (:meth:`coalmine.streams.sketcher.Sketcher.close`) as messages for the topic,
    in order: one, or, when it is larger than ``max_bytes`` (a source catching up on a backlog
    closes many buckets at once), several holding consecutive buckets. Each part but the last
    says its source closed only up to the next part's first bucket, so stage 2 never evaluates
    a bucket before all of it has arrived."""
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
    return encode_partial(first, max_bytes) + encode_partial(rest, max_bytes)


def decode_partial(raw: bytes) -> dict:
    """The partial back, arrays as bytes (:meth:`coalmine.streams.sketch.Summary.from_dict`
    reads them)."""
    return _decoder.decode(raw)


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


def readable_partial(raw: bytes) -> dict:
    """A partial message for people (``coalmine tail partials``): arrays as lists."""
    from coalmine.streams.sketch import Summary

    partial = decode_partial(raw)
    for variants in partial.get("buckets", {}).values():
        for variant, d in variants.items():
            version = d.pop("version", None)
            plain = {
                k: v.tolist() if isinstance(v, np.ndarray) else v
                for k, v in Summary.from_dict(d).to_dict().items()
            }
            variants[variant] = {**plain, "version": version}
    return partial
