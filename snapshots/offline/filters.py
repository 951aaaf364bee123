"""Qdrant filters (the REST API's JSON) compiled into predicates over points, and boolean masks.

Semantics follow Qdrant's filtering documentation and its reference implementation in
qdrant-client's local mode, which the integration tests compare against:

- `must` all, `must_not` none, `should` at least one (an empty `should` is no constraint),
  `min_should` at least `min_count` of its conditions; a clause is a list or a single condition,
  and a condition may itself be a filter.
- A field condition on an array matches when any element matches (`a[].b` walks arrays).
- `match.value`/`any`/`except` compare strictly by JSON type: 1 never equals 1.0 or true.
  `except` needs a non-null value not in the list, so a missing or null field does not match it.
- `match.text` (all tokens), `text_any` (one token), `phrase` (consecutive tokens) use Qdrant's
  default word tokenizer, lowercased; `prefix` and `substring` are case-sensitive on the raw string.
- `range` on numbers (booleans are not numbers); with RFC 3339 strings it is a datetime range.
- `is_empty`: the key is missing, null, or []. `is_null`: the value is null (or an array holding a
  null). `values_count`, `has_id`, `has_vector`, `nested`, `geo_radius`, `geo_bounding_box`.
- Unsupported here: `geo_polygon`, `slice` (a UsageError says so).
A malformed filter is a UsageError with a Qdrant-style "Format error in JSON body" message.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np

from snapshots.errors import UsageError
from snapshots.offline.layout import normalize_point_id
from snapshots.offline.payload_paths import parse_path, simple_key, value_getter, values_at

Predicate = Callable[[Any, Any, int], bool]  # (point id, payload, row) -> matches
VectorPresence = Callable[[str], "np.ndarray | None"]
FILTER_KEYS = frozenset({"must", "should", "must_not", "min_should"})
FIELD_KEYS = frozenset({"key", "match", "range", "geo_bounding_box", "geo_radius", "geo_polygon",
                        "values_count", "is_empty", "is_null"})
EARTH_RADIUS_M = 6371008.8
_TOKEN = re.compile(r"[^\W_]+")


def _always(pid: Any, payload: Any, row: int) -> bool:
    return True


def as_plain_filter(flt: Any) -> Any:
    """Accept qdrant-client's pydantic Filter as well as the REST JSON dict."""
    if flt is not None and hasattr(flt, "model_dump"):
        return flt.model_dump(by_alias=True, exclude_none=True, mode="json")
    return flt


def compile_filter(flt: Any, *, vector_presence: VectorPresence | None = None) -> Predicate:
    """Compile a Qdrant filter into a predicate `(point_id, payload, row) -> bool`.

    `vector_presence(name)` returns which rows hold that named vector (for `has_vector`), or None
    for an unknown name. None as the filter matches everything.
    """
    flt = as_plain_filter(flt)
    if flt is None:
        return _always
    return _Compiler(vector_presence).filter(flt, "filter")


def filter_mask(flt: Any, ids: Sequence[Any], payloads: Sequence[Any], *,
                vector_presence: VectorPresence | None = None) -> np.ndarray:
    """Evaluate a filter over all points: a boolean array, True where the point matches."""
    n = len(ids)
    pred = compile_filter(flt, vector_presence=vector_presence)
    if pred is _always:
        return np.ones(n, dtype=bool)
    return np.fromiter(map(pred, ids, payloads, range(n)), dtype=bool, count=n)


def _bad(where: str, message: str) -> UsageError:
    return UsageError(f"Format error in JSON body: {where}: {message}")


def tokenize(text: str) -> list[str]:
    """Qdrant's default `word` tokenizer, lowercased."""
    return _TOKEN.findall(text.lower())


def parse_datetime(text: str) -> datetime | None:
    """RFC 3339 and the looser forms Qdrant accepts ("2024-01-02 03:04:05", "2024-01-02"); naive is UTC."""
    s = text.strip()
    if s.endswith(" UTC"):
        s = s[:-4] + "+00:00"
    elif s and s[-1] in "zZ":
        s = s[:-1] + "+00:00"
    if (m := re.match(r"^(.*\.\d{6})\d+(.*)$", s)):
        s = m.group(1) + m.group(2)  # nanoseconds: datetime keeps microseconds
    if re.search(r"[+-]\d\d$", s) and len(s) > 10:
        s += ":00"
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def _same_value(value: Any, wanted: Any) -> bool:
    return type(value) is type(wanted) and value == wanted


def is_empty_at(payload: Any, key: str) -> bool:
    return all(v is None or (isinstance(v, list) and not v) for v in values_at(payload, key, flat=False))


def is_null_at(payload: Any, key: str) -> bool:
    return any(v is None or (isinstance(v, list) and any(e is None for e in v))
               for v in values_at(payload, key, flat=False))


def _geo(point: Any) -> tuple[float, float] | None:
    if not isinstance(point, dict):
        return None
    lat, lon = point.get("lat"), point.get("lon")
    if type(lat) not in (int, float) or type(lon) not in (int, float):
        return None
    if not (math.isfinite(lat) and math.isfinite(lon)):
        return None
    return float(lat), float(lon)


def _haversine(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (lat1, lon1, lat2, lon2))
    a = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(a))


def _plain_key_match(key: str, m: dict) -> Callable[[Any], bool] | None:
    """`match.value` / `match.any` on one plain key, inlined: the hot path of tenant-style filters."""
    plain = simple_key(key)
    if plain is None or set(m) not in ({"value"}, {"any"}):
        return None
    if "value" in m:
        wanted = m["value"]
        kind = type(wanted)

        def check_value(payload: Any) -> bool:
            v = payload.get(plain) if type(payload) is dict else None
            if type(v) is kind:
                return v == wanted
            return type(v) is list and any(type(x) is kind and x == wanted for x in v)

        return check_value
    strs = frozenset(x for x in m["any"] if type(x) is str)
    ints = frozenset(x for x in m["any"] if type(x) is int)

    def check_any(payload: Any) -> bool:
        v = payload.get(plain) if type(payload) is dict else None
        t = type(v)
        if t is str:
            return v in strs
        if t is int:
            return v in ints
        return t is list and any((type(x) is str and x in strs) or (type(x) is int and x in ints) for x in v)

    return check_any


class _Compiler:
    def __init__(self, vector_presence: VectorPresence | None):
        self.vector_presence = vector_presence

    def filter(self, obj: Any, where: str) -> Predicate:
        if not isinstance(obj, dict):
            raise _bad(where, f"expected a filter object, got {obj!r}")
        if unknown := set(obj) - FILTER_KEYS:
            raise _bad(where, f"unknown field(s) {sorted(unknown)}, expected one of {sorted(FILTER_KEYS)}")
        must = self.clause(obj.get("must"), f"{where}.must")
        should = self.clause(obj.get("should"), f"{where}.should")
        must_not = self.clause(obj.get("must_not"), f"{where}.must_not")
        min_count, min_should = 0, []
        if obj.get("min_should") is not None:
            ms = obj["min_should"]
            if not isinstance(ms, dict) or set(ms) != {"conditions", "min_count"}:
                raise _bad(f"{where}.min_should", "expected {\"conditions\": [...], \"min_count\": n}")
            min_count = ms["min_count"]
            if type(min_count) is not int or min_count < 1:
                raise UsageError(f"Validation error in JSON body: [{where}.min_should.min_count: "
                                 f"value {min_count!r} invalid, must be 1 or larger]")
            if not isinstance(ms["conditions"], list):
                raise _bad(f"{where}.min_should.conditions", "expected a list of conditions")
            min_should = self.clause(ms["conditions"], f"{where}.min_should.conditions")
        if not (must or should or must_not or min_should):
            return _always
        if len(must) == 1 and not (should or must_not or min_should):
            return must[0]

        def pred(pid: Any, payload: Any, row: int) -> bool:
            for c in must:
                if not c(pid, payload, row):
                    return False
            for c in must_not:
                if c(pid, payload, row):
                    return False
            if should and not any(c(pid, payload, row) for c in should):
                return False
            if min_should and sum(1 for c in min_should if c(pid, payload, row)) < min_count:
                return False
            return True

        return pred

    def clause(self, value: Any, where: str) -> list[Predicate]:
        if value is None:
            return []
        if isinstance(value, list):
            return [self.condition(c, f"{where}[{i}]") for i, c in enumerate(value)]
        return [self.condition(value, where)]

    def condition(self, c: Any, where: str) -> Predicate:
        if not isinstance(c, dict):
            raise _bad(where, f"expected a condition object, got {c!r}")
        if "key" in c:
            return self.field(c, where)
        if len(c) == 1:
            (kind, arg), = c.items()
            if kind in ("is_empty", "is_null"):
                if not isinstance(arg, dict) or set(arg) != {"key"}:
                    raise _bad(f"{where}.{kind}", "expected {\"key\": \"<payload key>\"}")
                key = arg["key"]
                parse_path(key)
                test = is_empty_at if kind == "is_empty" else is_null_at
                return lambda pid, payload, row: test(payload, key)
            if kind == "has_id":
                return self.has_id(arg, f"{where}.has_id")
            if kind == "has_vector":
                return self.has_vector(arg, f"{where}.has_vector")
            if kind == "nested":
                return self.nested(arg, f"{where}.nested")
            if kind in ("slice",):
                raise UsageError(f"Bad request: {where}: '{kind}' conditions are not supported by the offline index")
        if set(c) <= FILTER_KEYS:
            return self.filter(c, where)
        raise _bad(where, f"data did not match any variant of untagged enum Condition: {c!r}")

    def has_id(self, arg: Any, where: str) -> Predicate:
        if not isinstance(arg, list):
            raise _bad(where, "expected a list of point ids")
        wanted = {normalize_point_id(x) for x in arg}
        return lambda pid, payload, row: pid in wanted

    def has_vector(self, name: Any, where: str) -> Predicate:
        if not isinstance(name, str):
            raise _bad(where, "expected a vector name")
        presence = self.vector_presence(name) if self.vector_presence else None
        if presence is None:
            raise UsageError(f"Wrong input: Not existing vector name error: {name}")
        return lambda pid, payload, row: row >= 0 and bool(presence[row])

    def nested(self, arg: Any, where: str) -> Predicate:
        if not isinstance(arg, dict) or set(arg) != {"key", "filter"} or not isinstance(arg["key"], str):
            raise _bad(where, "expected {\"key\": \"<array key>\", \"filter\": {...}}")
        key = arg["key"][:-2] if arg["key"].endswith("[]") and len(arg["key"]) > 2 else arg["key"]
        parse_path(key)
        inner = _Compiler(None).filter(arg["filter"], f"{where}.filter")

        def pred(pid: Any, payload: Any, row: int) -> bool:
            for value in values_at(payload, key, flat=False):
                if isinstance(value, list):
                    for element in value:  # only objects are checked against a nested filter
                        if isinstance(element, dict) and inner(None, element, -1):
                            return True
            return False

        return pred

    def field(self, c: dict, where: str) -> Predicate:
        if unknown := set(c) - FIELD_KEYS:
            raise _bad(where, f"unknown field(s) {sorted(unknown)} in field condition")
        key = c["key"]
        if not isinstance(key, str):
            raise _bad(f"{where}.key", "expected a string")
        parse_path(key)
        checks: list[Callable[[Any], bool]] = []
        getter = value_getter(key)
        for kind, compile_value in (("match", self.match), ("range", self.range),
                                    ("geo_radius", self.geo_radius), ("geo_bounding_box", self.geo_bbox)):
            if c.get(kind) is not None:
                test = compile_value(c[kind], f"{where}.{kind}")
                fast = _plain_key_match(key, c[kind]) if kind == "match" else None
                checks.append(fast or (lambda payload, test=test: any(map(test, getter(payload)))))
        if c.get("geo_polygon") is not None:
            raise UsageError(f"Bad request: {where}: geo_polygon conditions are not supported by the offline index")
        if c.get("values_count") is not None:
            checks.append(self.values_count(c["values_count"], key, f"{where}.values_count"))
        for kind, test in (("is_empty", is_empty_at), ("is_null", is_null_at)):
            if c.get(kind) is not None:
                if not isinstance(c[kind], bool):
                    raise _bad(f"{where}.{kind}", "expected true or false")
                checks.append(lambda payload, test=test, flag=c[kind]: test(payload, key) == flag)
        if not checks:
            raise UsageError(f"Validation error in JSON body: [{where}: At least one field condition must be specified]")
        if len(checks) == 1:
            check = checks[0]
            return lambda pid, payload, row: check(payload)
        return lambda pid, payload, row: any(check(payload) for check in checks)

    def match(self, m: Any, where: str) -> Callable[[Any], bool]:
        if not isinstance(m, dict) or len(m) != 1:
            raise _bad(where, "expected exactly one of value, any, except, text, text_any, phrase, prefix, substring")
        (kind, arg), = m.items()
        if kind == "value":
            if type(arg) not in (bool, int, str):
                raise _bad(f"{where}.value", f"expected a string, integer or boolean, got {arg!r}")
            return lambda v: _same_value(v, arg)
        if kind in ("any", "except"):
            if not isinstance(arg, list) or not all(type(x) in (int, str) for x in arg):
                raise _bad(f"{where}.{kind}", "expected a list of strings or integers")
            strs = {x for x in arg if type(x) is str}
            ints = {x for x in arg if type(x) is int}

            def in_list(v: Any) -> bool:
                return (type(v) is str and v in strs) or (type(v) is int and v in ints)

            if kind == "any":
                return in_list
            return lambda v: v is not None and not in_list(v)
        if not isinstance(arg, str):
            raise _bad(f"{where}.{kind}", "expected a string")
        if kind == "text":
            tokens = set(tokenize(arg))
            return lambda v: bool(tokens) and isinstance(v, str) and tokens <= set(tokenize(v))
        if kind == "text_any":
            tokens = set(tokenize(arg))
            return lambda v: isinstance(v, str) and not tokens.isdisjoint(tokenize(v))
        if kind == "phrase":
            phrase = tokenize(arg)

            def has_phrase(v: Any) -> bool:
                if not phrase or not isinstance(v, str):
                    return False
                toks = tokenize(v)
                return any(toks[i:i + len(phrase)] == phrase for i in range(len(toks) - len(phrase) + 1))

            return has_phrase
        if kind == "prefix":
            return lambda v: isinstance(v, str) and v.startswith(arg)
        if kind == "substring":
            return lambda v: isinstance(v, str) and arg in v
        raise _bad(where, f"unknown match variant {kind!r}")

    def range(self, r: Any, where: str) -> Callable[[Any], bool]:
        unknown = set(r) - {"gt", "gte", "lt", "lte"} if isinstance(r, dict) else None
        if unknown is None or unknown:
            raise _bad(where, "expected an object with gt, gte, lt, lte"
                       + (f"; unknown keys {sorted(unknown)}" if unknown else ""))
        bounds = {k: v for k, v in r.items() if v is not None}
        if all(type(v) in (int, float) for v in bounds.values()):
            convert: Callable[[Any], Any] = lambda v: v if type(v) in (int, float) else None  # noqa: E731
        elif all(isinstance(v, str) for v in bounds.values()):
            parsed = {k: parse_datetime(v) for k, v in bounds.items()}
            if bad := [bounds[k] for k, v in parsed.items() if v is None]:
                raise _bad(where, f"not a number or an RFC 3339 datetime: {bad[0]!r}")
            bounds = parsed
            convert = lambda v: parse_datetime(v) if isinstance(v, str) else None  # noqa: E731
        else:
            raise _bad(where, "bounds must be all numbers or all RFC 3339 datetimes")
        gt, gte, lt, lte = (bounds.get(k) for k in ("gt", "gte", "lt", "lte"))

        def in_range(v: Any) -> bool:
            x = convert(v)
            if x is None or (isinstance(x, float) and math.isnan(x)):
                return False
            return ((gt is None or x > gt) and (gte is None or x >= gte)
                    and (lt is None or x < lt) and (lte is None or x <= lte))

        return in_range

    def values_count(self, vc: Any, key: str, where: str) -> Callable[[Any], bool]:
        if not isinstance(vc, dict) or set(vc) - {"gt", "gte", "lt", "lte"} or \
                not all(v is None or (type(v) is int and v >= 0) for v in vc.values()):
            raise _bad(where, "expected an object with non-negative integer gt, gte, lt, lte")
        gt, gte, lt, lte = (vc.get(k) for k in ("gt", "gte", "lt", "lte"))

        def ok(n: int) -> bool:
            return ((gt is None or n > gt) and (gte is None or n >= gte)
                    and (lt is None or n < lt) and (lte is None or n <= lte))

        def check(payload: Any) -> bool:
            values = values_at(payload, key, flat=False)
            if all(v is None for v in values):
                return ok(0)
            return any(ok(0 if v is None else len(v) if isinstance(v, list) else 1) for v in values)

        return check

    def geo_radius(self, g: Any, where: str) -> Callable[[Any], bool]:
        center = _geo(g.get("center")) if isinstance(g, dict) else None
        radius = g.get("radius") if isinstance(g, dict) else None
        if center is None or type(radius) not in (int, float):
            raise _bad(where, "expected {\"center\": {\"lon\": x, \"lat\": y}, \"radius\": meters}")

        def within(v: Any) -> bool:
            p = _geo(v)
            return p is not None and _haversine(p[0], p[1], center[0], center[1]) < radius

        return within

    def geo_bbox(self, g: Any, where: str) -> Callable[[Any], bool]:
        tl = _geo(g.get("top_left")) if isinstance(g, dict) else None
        br = _geo(g.get("bottom_right")) if isinstance(g, dict) else None
        if tl is None or br is None:
            raise _bad(where, "expected {\"top_left\": {lon, lat}, \"bottom_right\": {lon, lat}}")

        def within(v: Any) -> bool:
            p = _geo(v)
            if p is None:
                return False
            lat, lon = p
            if tl[1] > br[1]:  # the box crosses the antimeridian
                lon_ok = lon > tl[1] or lon < br[1]
            else:
                lon_ok = tl[1] < lon < br[1]
            return lon_ok and tl[0] > lat > br[0]

        return within
