"""The bytes on the wire between a client and the stage servers: one framed tensor, no pickle.

A frame is::

    b"APPS" | version (u8) | header length (u32, little endian) | header (UTF-8 JSON) | payload

The header holds the request and micro-batch ids, the tensor's shape and dtype (a name from
``DTYPES``) and the timings each stage added on the way (``[stage, arrived, start, end]``, wall
clock seconds); the payload is the tensor's raw C-order bytes. ``unpack`` checks every field
and that the payload size matches shape x itemsize, so a malformed frame is a ``WireError``
naming what is wrong, never an arbitrary object.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

MAGIC = b"APPS"
VERSION = 1
_PREFIX = struct.Struct("<4sBI")
MAX_HEADER = 1 << 20  # a header larger than this is refused before it is parsed
#: dtypes a frame may carry, by name (numpy's names; little-endian on the wire)
DTYPES: tuple[str, ...] = (
    "float32",
    "float64",
    "float16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
)

Timing = tuple[int, float, float, float]
"""One stage's record of a micro-batch: (stage, arrived, compute start, compute end)."""


class WireError(ValueError):
    """A frame that cannot be read (bad magic, header, dtype, or payload size)."""


@dataclass(frozen=True)
class Frame:
    """One micro-batch of a request: its tensor and the stages' timings so far."""

    request: int
    microbatch: int
    array: npt.NDArray[Any]
    timings: tuple[Timing, ...] = field(default=())


def pack(frame: Frame) -> bytes:
    """The frame's bytes (``unpack`` inverts it)."""
    arr = frame.array
    name = arr.dtype.name
    if name not in DTYPES:
        raise WireError(f"dtype {name} cannot travel in a frame (supported: {', '.join(DTYPES)})")
    header = {
        "request": int(frame.request),
        "microbatch": int(frame.microbatch),
        "shape": [int(d) for d in arr.shape],
        "dtype": name,
        "timings": [list(t) for t in frame.timings],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    payload = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
    return _PREFIX.pack(MAGIC, VERSION, len(head)) + head + payload


def unpack(data: bytes) -> Frame:
    """Read a frame; ``WireError`` says what is malformed."""
    if len(data) < _PREFIX.size:
        raise WireError(f"a frame has at least {_PREFIX.size} bytes, got {len(data)}")
    magic, version, size = _PREFIX.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise WireError(f"not an adaptive-pp frame (magic {magic!r}, version {version})")
    if size > MAX_HEADER or _PREFIX.size + size > len(data):
        raise WireError(f"header length {size} does not fit the {len(data)}-byte frame")
    try:
        header = json.loads(data[_PREFIX.size : _PREFIX.size + size])
        request, microbatch = int(header["request"]), int(header["microbatch"])
        shape = tuple(int(d) for d in header["shape"])
        dtype = str(header["dtype"])
        timings = tuple(_timing(t) for t in header.get("timings", ()))
    except (ValueError, KeyError, TypeError) as exc:
        raise WireError(f"malformed frame header: {exc}") from exc
    if dtype not in DTYPES:
        raise WireError(f"dtype {dtype!r} is not supported (supported: {', '.join(DTYPES)})")
    if any(d < 0 for d in shape):
        raise WireError(f"negative dimension in shape {shape}")
    payload = memoryview(data)[_PREFIX.size + size :]
    want = math.prod(shape) * np.dtype(dtype).itemsize
    if len(payload) != want:
        raise WireError(f"payload has {len(payload)} bytes; shape {shape} of {dtype} needs {want}")
    array = np.frombuffer(payload, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    return Frame(request, microbatch, array.astype(dtype, copy=False), timings)


def _timing(raw: Sequence[Any]) -> Timing:
    stage, arrived, start, end = raw
    return int(stage), float(arrived), float(start), float(end)
