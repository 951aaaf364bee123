"""Page-at-a-time work of the Qdrant encoder (backup/sources/qdrant.py) equals its one-vector
version bit for bit: local-mode canonical vectors, row norms, base64 rows."""
from __future__ import annotations

import numpy as np
import pytest

from backup.sources.qdrant import _row_norms, local_canonical, local_canonical_rows


@pytest.mark.parametrize("dim", [1, 3, 7, 16, 31, 100, 384, 1536])
def test_row_norms_are_np_linalg_norm_of_each_row_bit_for_bit(dim):
    rng = np.random.default_rng(dim)
    mat = (rng.standard_normal((500, dim)) * rng.uniform(1e-3, 1e3, size=(500, 1))).astype(np.float32)
    expected = np.array([np.linalg.norm(row) for row in mat], dtype=np.float32)
    assert _row_norms(mat).tobytes() == expected.tobytes()
    # a plain sum of squares rounds differently: the check above is not vacuous
    if dim >= 100:
        assert np.sqrt((mat * mat).sum(axis=1)).tobytes() != expected.tobytes()


def vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors as local mode stores them, raw ones, zero rows and tiny rows."""
    rng = np.random.default_rng(seed)
    raw = rng.standard_normal((n, dim)).astype(np.float32)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    mat = np.concatenate([unit, raw, np.zeros((3, dim), np.float32), np.full((3, dim), 1e-9, np.float32)])
    return mat.astype(np.float32)


@pytest.mark.parametrize("steps", [0, 1, 4])
@pytest.mark.parametrize("dim", [3, 64, 384])
def test_canonical_rows_equal_local_canonical_of_each_row(dim, steps):
    mat = vectors(300, dim, dim)
    expected = np.stack([local_canonical(row.copy()) for row in mat])
    rows = np.arange(len(mat))
    got = mat.copy()
    local_canonical_rows(got, rows, steps=steps)
    assert got.tobytes() == expected.tobytes()


def test_canonical_rows_touch_only_the_rows_named():
    mat = vectors(50, 16, 1)
    rows = np.arange(0, len(mat), 3)
    got = mat.copy()
    local_canonical_rows(got, rows)
    untouched = np.setdiff1d(np.arange(len(mat)), rows)
    assert got[untouched].tobytes() == mat[untouched].tobytes()
    assert got[rows].tobytes() == np.stack([local_canonical(mat[i].copy()) for i in rows]).tobytes()
    assert not np.array_equal(got[rows], mat[rows])  # some of them did change


@pytest.mark.parametrize("dim", [1, 2, 3, 4, 6, 384, 1024])
def test_page_base64_rows_equal_one_encoding_per_row(dim):
    import base64

    from backup.sources.qdrant import _b64, _b64_rows

    mat = np.random.default_rng(dim).standard_normal((37, dim)).astype(np.float32)
    rows = _b64_rows(mat)
    assert [r.decode() for r in rows] == [_b64(row) for row in mat]
    assert np.array_equal(np.stack([np.frombuffer(base64.b64decode(r), "<f4") for r in rows]), mat)
