import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

# 1 thread: tests are small-op bound, and on a shared machine multi-threaded torch can be 3-30x slower
torch.set_num_threads(1)

_IDX_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype("i2"): 0x0B, np.dtype("i4"): 0x0C}
_IDX_CODES.update({np.dtype("f4"): 0x0D, np.dtype("f8"): 0x0E})


def _idx_bytes(arr: np.ndarray) -> bytes:
    """The IDX encoding of ``arr`` (header + big-endian data), written independently of gmflow.data.idx."""
    header = bytes([0, 0, _IDX_CODES[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx_file(path: Path, data: bytes | np.ndarray) -> Path:
    """Write IDX bytes (or an array, encoded) to ``path``, gzip-compressed when the name ends in .gz."""
    raw = _idx_bytes(data) if isinstance(data, np.ndarray) else data
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


@pytest.fixture
def idx_bytes():
    """``idx_bytes(array)``: the IDX encoding of an array (header + big-endian data)."""
    return _idx_bytes


@pytest.fixture
def write_idx():
    """``write_idx(path, bytes_or_array)``: write an IDX file (gzip when ``path`` ends in ``.gz``)."""
    return write_idx_file


@pytest.fixture
def fake_fmnist(tmp_path):
    """``make(n_train=40, n_test=20, gz=True, name="fm")``: a synthetic Fashion-MNIST directory.

    Image ``i`` of a split has label ``i % 10`` and random grey levels, except pixel (0, 0) = 255 and
    pixel (0, 1) = 0 (so both ends of the range occur); returns the directory.
    """

    def make(n_train: int = 40, n_test: int = 20, gz: bool = True, name: str = "fm") -> Path:
        d = tmp_path / name
        d.mkdir()
        rng = np.random.default_rng(0)
        ext = ".gz" if gz else ""
        for prefix, n in (("train", n_train), ("t10k", n_test)):
            x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
            x[:, 0, 0], x[:, 0, 1] = 255, 0
            write_idx_file(d / f"{prefix}-images-idx3-ubyte{ext}", x)
            write_idx_file(d / f"{prefix}-labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8))
        return d

    return make
