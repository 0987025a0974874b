"""Reader of the IDX file format (MNIST, Fashion-MNIST), plain or gzip-compressed.

An IDX file is a header followed by the array, row-major, big-endian::

    bytes 0-1   0x00 0x00                      (magic)
    byte  2     dtype code: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64
    byte  3     number of dimensions d >= 1
    4 d bytes   the d sizes, each an unsigned 32-bit big-endian integer
    the data    prod(sizes) items of the dtype

A file whose first two bytes are the gzip magic ``1f 8b`` is decompressed first, whatever its name.
Every defect (bad magic, unknown dtype code, truncated header or data, trailing bytes, damaged gzip
stream) raises a one-line ``ValueError`` naming the file and the problem.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IDX_DTYPES", "read_idx"]

IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read IDX file {path}: {err.strerror or err}") from err
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise ValueError(f"corrupt IDX file {path}: damaged gzip stream ({err})") from err


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in the IDX file ``path`` (gzip-compressed or not), read-only, native byte order.

    Raises ``ValueError`` (one line, naming the file) when the file cannot be read or its header and
    size are inconsistent; see the module docstring for the format.
    """
    path = Path(path)
    buf = _read_bytes(path)
    if len(buf) < 4:
        raise ValueError(f"corrupt IDX file {path}: {len(buf)} bytes, shorter than the 4-byte magic")
    if buf[0] != 0 or buf[1] != 0:
        raise ValueError(
            f"corrupt IDX file {path}: bad magic 0x{buf[:4].hex()} (expected 0x0000 followed by a dtype "
            "code and the number of dimensions)"
        )
    code, ndim = buf[2], buf[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(f"corrupt IDX file {path}: unknown dtype code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise ValueError(f"corrupt IDX file {path}: 0 dimensions in the header (expected >= 1)")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(
            f"corrupt IDX file {path}: truncated header ({len(buf)} bytes, {ndim} dimensions need {header})"
        )
    shape = tuple(int(s) for s in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    found = len(buf) - header
    if found != expected:
        what = "truncated data" if found < expected else "trailing bytes after the data"
        raise ValueError(
            f"corrupt IDX file {path}: {what} (header says {dtype.name} of shape {shape}, i.e. {expected} "
            f"bytes; found {found})"
        )
    arr = (
        np.frombuffer(buf, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="), copy=False)
    )
    arr.setflags(write=False)
    return arr
