"""Page-at-a-time work of the Qdrant encoder (backup/sources/qdrant_records.py) equals its one-vector
version bit for bit: local-mode canonical vectors, row norms, base64 rows."""
from __future__ import annotations

import numpy as np
import pytest

from backup.sources.qdrant_records import _row_norms, local_canonical, local_canonical_rows


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

    from backup.sources.qdrant_records import _b64, _b64_rows

    mat = np.random.default_rng(dim).standard_normal((37, dim)).astype(np.float32)
    rows = _b64_rows(mat)
    assert [r.decode() for r in rows] == [_b64(row) for row in mat]
    assert np.array_equal(np.stack([np.frombuffer(base64.b64decode(r), "<f4") for r in rows]), mat)


@pytest.mark.parametrize("dim", [1, 3, 384])
def test_float32_matrix_is_np_array_float32_bit_for_bit(dim):
    """struct's row packing rounds a double to float32 exactly as numpy's cast does: float32
    values (what Qdrant holds), arbitrary doubles that must round, subnormals, -0.0, ints."""
    from backup.sources.qdrant_records import float32_matrix

    rng = np.random.default_rng(dim)
    as_f32 = rng.standard_normal((20, dim)).astype(np.float32).tolist()
    doubles = (rng.standard_normal((20, dim)) * 10.0 ** rng.integers(-40, 38, size=(20, 1))).tolist()
    specials = [[[-0.0, 1e-45, 3.4028234663852886e38, 7, -2 ** 24 - 1][i % 5] for i in range(dim)]]
    for rows in (as_f32, doubles, specials):
        got = float32_matrix(rows, dim)
        assert got.flags.writeable and got.dtype == np.float32 and got.shape == (len(rows), dim)
        assert got.tobytes() == np.array(rows, dtype=np.float32).tobytes()


def test_float32_matrix_refuses_rows_of_another_size_and_overflows_like_numpy():
    from backup.sources.qdrant_records import float32_matrix

    with pytest.raises(ValueError):
        float32_matrix([[1.0, 2.0, 3.0], [1.0, 2.0]], 3)
    with pytest.raises(ValueError):
        float32_matrix([[1.0, 2.0], [1.0, 2.0]], 3)
    with np.errstate(over="ignore"):
        assert float32_matrix([[1e39, -1e39, 1.0]], 3).tolist() == [[np.inf, -np.inf, 1.0]]
