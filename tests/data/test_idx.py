"""gmflow.data.idx: the IDX reader on tiny synthetic files (plain and gzip), and its one-line errors."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from gmflow.data import read_idx


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
def test_round_trip_every_dtype(tmp_path, write_idx, dtype, gz):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = write_idx(tmp_path / ("a.idx.gz" if gz else "a.idx"), arr)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative and out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, arr)
    assert not out.flags.writeable


def test_gzip_is_detected_by_content_not_name(tmp_path, write_idx, idx_bytes):
    labels = np.arange(7, dtype=np.uint8)
    path = tmp_path / "labels-idx1-ubyte"  # no .gz suffix, but compressed
    path.write_bytes(gzip.compress(idx_bytes(labels)))
    np.testing.assert_array_equal(read_idx(path), labels)
    assert read_idx(write_idx(tmp_path / "one.idx", np.zeros((1,), np.uint8))).shape == (1,)


def _corrupt(tmp_path, raw: bytes, gz: bool = False) -> str:
    path = tmp_path / ("bad.gz" if gz else "bad")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(ValueError) as info:
        read_idx(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


@pytest.mark.parametrize("gz", [False, True])
def test_corrupt_files_give_one_line_errors_naming_the_defect(tmp_path, idx_bytes, gz):
    good = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    assert "bad magic 0x01000803" in _corrupt(tmp_path, b"\x01" + good[1:], gz)
    assert "unknown dtype code 0x07" in _corrupt(tmp_path, good[:2] + b"\x07" + good[3:], gz)
    assert "0 dimensions" in _corrupt(tmp_path, good[:3] + b"\x00", gz)
    assert "truncated header" in _corrupt(tmp_path, good[:9], gz)  # 3 dims need 16 header bytes
    assert "shorter than the 4-byte magic" in _corrupt(tmp_path, good[:2], gz)
    msg = _corrupt(tmp_path, good[:-1], gz)
    assert "truncated data" in msg and "(2, 3, 4)" in msg and "24 bytes; found 23" in msg
    assert "trailing bytes" in _corrupt(tmp_path, good + b"\x00", gz)


def test_damaged_gzip_stream_and_unreadable_file(tmp_path, idx_bytes):
    comp = gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8)))
    assert "damaged gzip stream" in _corrupt(tmp_path, comp[: len(comp) // 2])
    with pytest.raises(ValueError, match="cannot read IDX file .*missing"):
        read_idx(tmp_path / "missing")
