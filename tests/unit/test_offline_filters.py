"""Qdrant filter semantics of the offline index, as a table; each row is also checked against
qdrant-client's local-mode filter evaluation, the reference our integration tests compare with."""
from __future__ import annotations

import numpy as np
import pytest

from snapshots.errors import UsageError
from snapshots.offline.filters import compile_filter, filter_mask, parse_datetime, tokenize

UUID = "550e8400-e29b-41d4-a716-446655440000"


def field(key, **cond):
    return {"key": key, **cond}


def match(key, **m):
    return {"key": key, "match": m}


def rng(key, **r):
    return {"key": key, "range": r}


# (payload, filter, expected)
CASES = [
    # match value: exact, strict JSON types, any element of an array
    ({"city": "London"}, {"must": [match("city", value="London")]}, True),
    ({"city": "london"}, {"must": [match("city", value="London")]}, False),
    ({"city": ["Berlin", "London"]}, {"must": [match("city", value="London")]}, True),
    ({}, {"must": [match("city", value="London")]}, False),
    ({"city": None}, {"must": [match("city", value="London")]}, False),
    ({"n": 1}, {"must": [match("n", value=1)]}, True),
    ({"n": 1.0}, {"must": [match("n", value=1)]}, False),
    ({"n": True}, {"must": [match("n", value=1)]}, False),
    ({"n": 1}, {"must": [match("n", value=True)]}, False),
    ({"b": False}, {"must": [match("b", value=False)]}, True),
    ({"n": "1"}, {"must": [match("n", value=1)]}, False),
    # match any / except
    ({"color": "red"}, {"must": [match("color", any=["red", "blue"])]}, True),
    ({"color": ["green", "blue"]}, {"must": [match("color", any=["red", "blue"])]}, True),
    ({"color": "green"}, {"must": [match("color", any=["red", "blue"])]}, False),
    ({"color": "red"}, {"must": [match("color", any=[])]}, False),
    ({"n": 3}, {"must": [match("n", any=[1, 3])]}, True),
    ({"color": "green"}, {"must": [match("color", **{"except": ["red", "blue"]})]}, True),
    ({"color": "red"}, {"must": [match("color", **{"except": ["red", "blue"]})]}, False),
    ({"color": ["red", "green"]}, {"must": [match("color", **{"except": ["red"]})]}, True),
    ({"color": ["red"]}, {"must": [match("color", **{"except": ["red"]})]}, False),
    ({}, {"must": [match("color", **{"except": ["red"]})]}, False),
    ({"color": None}, {"must": [match("color", **{"except": ["red"]})]}, False),
    # full text (tokens, case-insensitive), phrase, prefix and substring (raw, case-sensitive)
    ({"d": "The quick brown Fox"}, {"must": [match("d", text="fox QUICK")]}, True),
    ({"d": "The quick brown Fox"}, {"must": [match("d", text="qui")]}, False),
    ({"d": "The quick brown Fox"}, {"must": [match("d", text="fox dog")]}, False),
    ({"d": "The quick brown Fox"}, {"must": [match("d", text_any="fox dog")]}, True),
    ({"d": "The quick brown Fox"}, {"must": [match("d", phrase="brown fox")]}, True),
    ({"d": "The quick brown Fox"}, {"must": [match("d", phrase="fox brown")]}, False),
    ({"d": "The quick brown Fox"}, {"must": [match("d", prefix="The q")]}, True),
    ({"d": "The quick brown Fox"}, {"must": [match("d", prefix="the")]}, False),
    ({"d": "The quick brown Fox"}, {"must": [match("d", substring="ck br")]}, True),
    ({"d": "The quick brown Fox"}, {"must": [match("d", substring="Quick")]}, False),
    ({"d": ["no", "brown fox here"]}, {"must": [match("d", text="fox")]}, True),
    # numeric range: booleans and strings are not numbers; arrays match if any element does
    ({"p": 10}, {"must": [rng("p", gte=10)]}, True),
    ({"p": 10}, {"must": [rng("p", gt=10)]}, False),
    ({"p": 9.5}, {"must": [rng("p", gt=9, lt=10)]}, True),
    ({"p": [1, 20]}, {"must": [rng("p", gt=15)]}, True),
    ({"p": [1, 2]}, {"must": [rng("p", gt=15)]}, False),
    ({"p": "10"}, {"must": [rng("p", gte=0)]}, False),
    ({"p": True}, {"must": [rng("p", gte=0)]}, False),
    ({"p": 5}, {"must": [rng("p", lte=5, lt=6)]}, True),
    # datetime range, RFC 3339 with offsets; naive means UTC
    ({"t": "2024-01-02T03:00:00Z"}, {"must": [rng("t", gt="2024-01-01T00:00:00Z")]}, True),
    ({"t": "2024-01-02 03:00:00"}, {"must": [rng("t", lt="2024-01-02T04:00:00+01:00")]}, False),
    ({"t": "2024-01-02T03:00:00+02:00"}, {"must": [rng("t", lt="2024-01-02T02:00:00Z")]}, True),
    ({"t": "not a date"}, {"must": [rng("t", gt="2024-01-01T00:00:00Z")]}, False),
    # is_empty: missing, null or []; is_null: null only (or an array holding null)
    ({}, {"must": [{"is_empty": {"key": "a"}}]}, True),
    ({"a": None}, {"must": [{"is_empty": {"key": "a"}}]}, True),
    ({"a": []}, {"must": [{"is_empty": {"key": "a"}}]}, True),
    ({"a": [1]}, {"must": [{"is_empty": {"key": "a"}}]}, False),
    ({"a": ""}, {"must": [{"is_empty": {"key": "a"}}]}, False),
    ({"a": 0}, {"must": [{"is_empty": {"key": "a"}}]}, False),
    ({"a": {}}, {"must": [{"is_empty": {"key": "a"}}]}, False),
    ({"a": None}, {"must": [{"is_null": {"key": "a"}}]}, True),
    ({}, {"must": [{"is_null": {"key": "a"}}]}, False),
    ({"a": []}, {"must": [{"is_null": {"key": "a"}}]}, False),
    ({"a": [None]}, {"must": [{"is_null": {"key": "a"}}]}, True),
    ({"a": "x"}, {"must": [{"is_null": {"key": "a"}}]}, False),
    ({"a": [1]}, {"must": [field("a", is_empty=False)]}, True),
    ({"a": None}, {"must": [field("a", is_null=True)]}, True),
    # nested keys and array paths
    ({"a": {"b": 5}}, {"must": [match("a.b", value=5)]}, True),
    ({"a": [{"b": 5}, {"b": 6}]}, {"must": [match("a[].b", value=6)]}, True),
    ({"a": [{"b": 5}, {"b": 6}]}, {"must": [match("a.b", value=6)]}, False),
    ({"a": [{"b": 5}, {"b": 6}]}, {"must": [match("a[1].b", value=6)]}, True),
    ({"a": [{"b": 5}, {"b": 6}]}, {"must": [match("a[0].b", value=6)]}, False),
    ({"a": [[1, 2], [3]]}, {"must": [match("a[]", value=3)]}, True),
    ({"a.b": 1}, {"must": [match('"a.b"', value=1)]}, True),
    # boolean structure
    ({"x": 1}, {"must": match("x", value=1)}, True),
    ({"x": 1}, {"should": []}, True),
    ({"x": 1}, {}, True),
    ({"x": 1, "y": 2}, {"should": [match("x", value=2), match("y", value=2)]}, True),
    ({"x": 1, "y": 2}, {"should": [match("x", value=2), match("y", value=3)]}, False),
    ({"x": 1}, {"must_not": [match("x", value=1)]}, False),
    ({"x": 1}, {"must_not": match("x", value=2)}, True),
    ({"x": 1, "y": 2}, {"must": [match("x", value=1)], "must_not": [match("y", value=2)]}, False),
    ({"x": 1, "y": 2}, {"must": [{"should": [match("x", value=5), {"must_not": [match("y", value=3)]}]}]}, True),
    ({"a": 1, "b": 2, "c": 9},
     {"min_should": {"conditions": [match("a", value=1), match("b", value=2), match("c", value=3)], "min_count": 2}},
     True),
    ({"a": 1, "b": 0, "c": 9},
     {"min_should": {"conditions": [match("a", value=1), match("b", value=2), match("c", value=3)], "min_count": 2}},
     False),
    # nested filter: all conditions must hold on ONE array element
    ({"items": [{"a": 1, "b": 3}, {"a": 2, "b": 2}]},
     {"must": [{"nested": {"key": "items", "filter": {"must": [match("a", value=1), match("b", value=2)]}}}]}, False),
    ({"items": [{"a": 1, "b": 3}, {"a": 2, "b": 2}]},
     {"must": [match("items[].a", value=1), match("items[].b", value=2)]}, True),
    ({"items": [{"a": 1, "b": 2}]},
     {"must": [{"nested": {"key": "items[]", "filter": {"must": [match("a", value=1), match("b", value=2)]}}}]}, True),
    ({"items": {"a": 1, "b": 2}},
     {"must": [{"nested": {"key": "items", "filter": {"must": [match("a", value=1)]}}}]}, False),
    # values_count
    ({"tags": ["a", "b"]}, {"must": [field("tags", values_count={"gte": 2})]}, True),
    ({"tags": ["a", "b"]}, {"must": [field("tags", values_count={"lt": 2})]}, False),
    ({"tags": "a"}, {"must": [field("tags", values_count={"lt": 2})]}, True),
    ({}, {"must": [field("tags", values_count={"lt": 1})]}, True),
    # ids
    ({}, {"must": [{"has_id": [1, 5]}]}, "id:5"),
    ({}, {"must": [{"has_id": [1, 2]}]}, "id:5-no"),
    ({}, {"must": [{"has_id": [UUID.upper().replace("-", "")]}]}, "id:uuid"),
    # geo
    ({"loc": {"lon": 13.405, "lat": 52.52}},
     {"must": [field("loc", geo_radius={"center": {"lon": 13.4, "lat": 52.5}, "radius": 5000.0})]}, True),
    ({"loc": {"lon": -0.1278, "lat": 51.5074}},
     {"must": [field("loc", geo_radius={"center": {"lon": 13.4, "lat": 52.5}, "radius": 5000.0})]}, False),
    ({"loc": [{"lon": 0, "lat": 0}, {"lon": 13.405, "lat": 52.52}]},
     {"must": [field("loc", geo_bounding_box={"top_left": {"lon": 13.0, "lat": 53.0},
                                              "bottom_right": {"lon": 14.0, "lat": 52.0}})]}, True),
]


def _point(expected):
    if expected == "id:5":
        return 5, True
    if expected == "id:5-no":
        return 5, False
    if expected == "id:uuid":
        return UUID, True
    return 7, expected


@pytest.mark.parametrize("payload,flt,expected", CASES, ids=[str(i) for i in range(len(CASES))])
def test_filter_table(payload, flt, expected):
    point_id, want = _point(expected)
    assert compile_filter(flt)(point_id, payload, 0) is want


@pytest.mark.parametrize("payload,flt,expected", CASES, ids=[str(i) for i in range(len(CASES))])
def test_filter_table_agrees_with_qdrant_local_mode(payload, flt, expected):
    from qdrant_client.http import models
    from qdrant_client.local.payload_filters import check_filter

    point_id, want = _point(expected)
    assert check_filter(models.Filter.model_validate(flt), payload, point_id, has_vector={}) is want


def test_mask_over_points_and_pydantic_filters():
    from qdrant_client.http import models
    ids = [1, 2, 3, 4]
    payloads = [{"g": 0}, {"g": 1}, {}, {"g": [0, 1]}]
    flt = models.Filter(must=[models.FieldCondition(key="g", match=models.MatchValue(value=0))])
    assert filter_mask(flt, ids, payloads).tolist() == [True, False, False, True]
    assert filter_mask(None, ids, payloads).tolist() == [True] * 4
    assert filter_mask({"must_not": [{"has_id": [2, 3]}]}, ids, payloads).tolist() == [True, False, False, True]


def test_has_vector_uses_row_presence():
    presence = {"image": np.array([True, False, True])}
    mask = filter_mask({"must": [{"has_vector": "image"}]}, [1, 2, 3], [{}, {}, {}], vector_presence=presence.get)
    assert mask.tolist() == [True, False, True]
    with pytest.raises(UsageError, match="Not existing vector name"):
        compile_filter({"must": [{"has_vector": "audio"}]}, vector_presence=presence.get)


@pytest.mark.parametrize("flt,message", [
    ({"must": [{"foo": 1}]}, "filter.must\\[0\\].*untagged enum Condition"),
    ({"mus": []}, "unknown field"),
    ({"must": [match("x", value=1.5)]}, "filter.must\\[0\\].match.value"),
    ({"must": [match("x", value=1, any=[1])]}, "exactly one"),
    ({"must": [match("x", regex="a.*")]}, "unknown match variant"),
    ({"must": [rng("x", gt="yesterday")]}, "RFC 3339"),
    ({"must": [rng("x", gt=1, lt="2024-01-01")]}, "all numbers"),
    ({"must": [{"key": "x"}]}, "At least one field condition"),
    ({"must": [match("a..b", value=1)]}, "invalid payload key"),
    ({"must": [match("a[x]", value=1)]}, "bad index"),
    ({"must": [{"has_id": ["not-a-uuid"]}]}, "point id"),
    ({"must": [{"is_empty": "a"}]}, "is_empty"),
    ({"min_should": {"conditions": [match("x", value=1)], "min_count": 0}}, "min_count"),
    ({"must": [field("loc", geo_polygon={"exterior": {"points": []}})]}, "geo_polygon.*not supported"),
    ("must", "expected a filter object"),
])
def test_malformed_filters_are_usage_errors(flt, message):
    with pytest.raises(UsageError, match=message):
        compile_filter(flt)


def test_helpers():
    assert tokenize("Hello, wOrld_again 42!") == ["hello", "world", "again", "42"]
    assert parse_datetime("2024-01-02T03:04:05.123456789Z").microsecond == 123456
    assert parse_datetime("2024-01-02 03:04:05+01").utcoffset().total_seconds() == 3600
    assert parse_datetime("2024-01-02").tzinfo is not None
    assert parse_datetime("yesterday") is None
