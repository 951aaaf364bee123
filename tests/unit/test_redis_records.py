"""The redis-jsonl-v1 record helpers and key-name sorting: pure logic, no server."""
from __future__ import annotations

import orjson
import pytest

from backup.sources.redis_keys import selector_may_match, sorted_minus, sorted_unique
from backup.sources.redis_records import canonical, encode_record, record_head, record_key, zset_value


@pytest.mark.parametrize("key", [b"plain", b'q"uo\\te","t":"x', "ünï".encode(), b"\xff\x00bin", b""])
def test_record_key_and_head_decode_only_the_key(key):
    record, canon = encode_record(key, "list", [{"x": 1}, ',"x":5}'], 1795696330104, part=2)
    assert record_key(record) == key
    assert record_head(record) == (key, "list", 2, 1795696330104)
    assert canonical(record) == canon
    assert orjson.loads(canon) == {k: v for k, v in orjson.loads(record).items() if k != "x"}


def test_sorted_unique_spills_runs_and_merges_without_duplicates():
    names = [f"k{i % 997:04d}".encode() for i in range(5000)]
    assert list(sorted_unique(names, run_limit=100)) == sorted(set(names))


def test_sorted_minus_yields_names_missing_from_the_right():
    assert list(sorted_minus([b"a", b"b", b"d", b"e"], [b"b", b"c", b"e"])) == [b"a", b"d"]


def test_zset_scores_are_exact_whatever_text_the_server_used():
    flat = [b"a", b"0.10000000000000001", b"b", b"0.1", b"c", b"inf", b"d", b"-inf", b"e", b"1e+300"]
    assert zset_value(flat) == [["a", "0.1"], ["b", "0.1"], ["c", "inf"], ["d", "-inf"], ["e", "1e+300"]]


@pytest.mark.parametrize("selector, pattern, earlier, may", [
    ("history:u42", "history:*", [], True),
    ("history:u42", "*", ["history:*"], False),       # belongs to the earlier item
    ("history:u42:*", "*", ["history:*"], False),
    ("hist*", "*", ["history:*"], True),               # may match "hist", which is the second item's
    ("session:*", "history:*", [], False),
    ("h*", "history:*", [], True),
])
def test_selector_may_match_prunes_items_that_cannot_hold_the_selection(selector, pattern, earlier, may):
    assert selector_may_match(selector, pattern, earlier) is may
