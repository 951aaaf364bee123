"""The redis-jsonl record helpers and key-name sorting: pure logic, no server."""
from __future__ import annotations

import orjson
import pytest

from backup.sources.redis_keys import selector_may_match, sorted_minus, sorted_unique
from backup.sources.redis_records import (canonical, encode_record, field_expiries, json_bodies, json_strings,
                                          record_expiry, record_head, record_key, zset_value)


@pytest.mark.parametrize("key", [b"plain", b'q"uo\\te","t":"x', "ünï".encode(), b"\xff\x00bin", b""])
def test_record_key_and_head_decode_only_the_key(key):
    record, canon = encode_record(key, "list", [{"x": 1}, ',"x":5}'], 1795696330104, part=2)
    assert record_key(record) == key
    assert record_head(record) == (key, "list", 2, 1795696330104)
    assert canonical(record) == canon
    assert orjson.loads(canon) == {k: v for k, v in orjson.loads(record).items() if k != "x"}


@pytest.mark.parametrize("x", [None, 1795696330104])
def test_field_expiries_follow_the_key_expiry_and_stay_out_of_the_canonical_form(x):
    fx = [["a", 1795696330999], [{"b64": "/w=="}, 1795696331000]]
    record, canon = encode_record(b'h,"x":1', "hash", [["a", ',"x":5,"fx":[]'], [{"b64": "/w=="}, "2"]], x,
                                  part=1, field_expiries=fx)
    assert record.endswith(b',"fx":' + orjson.dumps(fx) + b"}\n")
    assert field_expiries(record) == fx
    assert record_expiry(record) == x and record_head(record) == (b'h,"x":1', "hash", 1, x)
    assert canonical(record) == canon == encode_record(b'h,"x":1', "hash", orjson.loads(canon)["v"], x, 1)[1]
    plain, _ = encode_record(b"h", "hash", [["a", ',"fx":[["a",1]]']], x)
    assert field_expiries(plain) is None and record_expiry(plain) == x


def test_sorted_unique_spills_runs_and_merges_without_duplicates():
    names = [f"k{i % 997:04d}".encode() for i in range(5000)]
    assert list(sorted_unique(names, run_limit=100)) == sorted(set(names))


@pytest.mark.parametrize("run_limit, block, max_runs", [(50, 7, 3), (300, 1000, 32), (10_000, 3, 2), (20, 5, 2)])
def test_sorted_unique_merges_binary_names_of_any_length_across_blocks(monkeypatch, run_limit, block, max_runs):
    import random

    import backup.sources.redis_keys as redis_keys

    monkeypatch.setattr(redis_keys, "_RUN_BLOCK", block)
    monkeypatch.setattr(redis_keys, "MAX_RUNS", max_runs)
    rng = random.Random(run_limit)
    pool = [b"", b"\x00", b"\xff" * 3, b"a", b"a\x00", b"ab"] + [rng.randbytes(rng.randrange(0, 12)) for _ in range(700)]
    names = [rng.choice(pool) for _ in range(3000)]  # repeats within and across runs
    assert list(sorted_unique(names, run_limit=run_limit)) == sorted(set(names))


def test_runs_are_merged_by_level_so_open_files_and_buffers_stay_bounded(monkeypatch):
    import backup.sources.redis_keys as redis_keys

    monkeypatch.setattr(redis_keys, "MAX_RUNS", 4)
    monkeypatch.setattr(redis_keys, "_RUN_BLOCK", 50)
    live, most_live, blocks = set(), [0], []
    real_init, real_close, real_next = redis_keys._Run.__init__, redis_keys._Run.close, redis_keys._Run.next_block

    def init(self, names=()):
        live.add(id(self))  # before the names: a merged run is open while its inputs are read
        most_live[0] = max(most_live[0], len(live))
        real_init(self, names)

    def close(self):
        live.discard(id(self))
        real_close(self)

    def next_block(self):
        block = real_next(self)
        blocks.append(len(block))
        return block

    monkeypatch.setattr(redis_keys._Run, "__init__", init)
    monkeypatch.setattr(redis_keys._Run, "close", close)
    monkeypatch.setattr(redis_keys._Run, "next_block", next_block)
    names = [b"k%07d" % i for i in range(20_000)]
    pages = [names[i:i + 100][::-1] for i in range(0, len(names), 100)][::-1]
    assert list(redis_keys.sorted_unique_pages(pages, run_limit=100)) == names  # 200 runs of 100
    assert not live  # every temp file closed
    # 200 runs, 4 per level: at most 3 waiting on each of 4 levels, plus the merged one being written
    assert 4 <= most_live[0] <= 3 * 4 + 1, most_live
    assert max(blocks) <= 50  # a merge buffers one stored block of each run


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


@pytest.mark.parametrize("texts", [
    ["a"], [""], ["", ""], ["plain", "text", "here"],
    ['{"user":"u1","role":"user"}', '["a","b"]', 'ends with a quote"', '","', '"', ""],
    ["back\\", '","', "slash\\", "x"],            # a backslash before a real separator
    ['quote\\",', '"x', '\\","', "y"],             # '\\","' inside a string: the slow path
    ["line\nbreak", "tab\tand\u0001control", "ünï©ødé ☃", "\U0001F600", "\\"],
    ["nul\x00inside", "a"], ["del\x7f", '"\\"', ""],  # a NUL: not the ASCII path's separator
])
def test_json_strings_equals_one_dumps_per_text(texts):
    expected = [orjson.dumps(t)[1:-1] for t in texts]
    assert json_strings(texts) == expected
    assert json_bodies([t.encode() for t in texts]) == expected  # from bytes: the ASCII path or orjson's


def test_json_bodies_refuses_what_is_not_utf8():
    with pytest.raises(UnicodeDecodeError):
        json_bodies([b"ok", b"\xff"])
