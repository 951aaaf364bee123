"""Qdrant payload key paths: `a.b`, `a[].b`, `a[0]`, `"key.with.dots"`; values at a path; payload selectors.

A path walks objects by key; `[]` walks every element of an array, `[n]` one element. A key that
meets an array without `[]` does not look inside it (Qdrant's rule). For match and range conditions
the array a path ends on is unwrapped one level, so a condition on an array field matches when any
element matches.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from snapshots.errors import UsageError

WILDCARD = None  # a `[]` step; keys are str, indexes int


@lru_cache(maxsize=1024)
def parse_path(key: str) -> tuple[str | int | None, ...]:
    """Split a Qdrant payload key into steps; an invalid one is a UsageError."""
    if not isinstance(key, str) or not key:
        raise UsageError(f"Bad request: invalid payload key {key!r}")
    steps: list[str | int | None] = []
    i, n = 0, len(key)
    while True:
        if i < n and key[i] == '"':
            end = key.find('"', i + 1)
            if end == -1:
                raise UsageError(f"Bad request: invalid payload key {key!r}: unclosed quote")
            steps.append(key[i + 1:end])
            i = end + 1
        else:
            start = i
            while i < n and (key[i].isalnum() or key[i] in "_-"):
                i += 1
            if i == start:
                raise UsageError(f"Bad request: invalid payload key {key!r}")
            steps.append(key[start:i])
        while i < n and key[i] == "[":
            end = key.find("]", i)
            if end == -1:
                raise UsageError(f"Bad request: invalid payload key {key!r}: unclosed bracket")
            inner = key[i + 1:end]
            if inner == "":
                steps.append(WILDCARD)
            elif inner.isascii() and inner.isdigit():
                steps.append(int(inner))
            else:
                raise UsageError(f"Bad request: invalid payload key {key!r}: bad index [{inner}]")
            i = end + 1
        if i == n:
            return tuple(steps)
        if key[i] != "." or i + 1 == n:
            raise UsageError(f"Bad request: invalid payload key {key!r}")
        i += 1


def values_at(payload: Any, key: str, *, flat: bool = True) -> list[Any]:
    """Every value the path selects (an empty list if none); with `flat`, a selected array is unwrapped."""
    steps = parse_path(key)
    out: list[Any] = []

    def walk(data: Any, k: int) -> None:
        if k == len(steps):
            if flat and isinstance(data, list):
                out.extend(data)
            else:
                out.append(data)
            return
        step = steps[k]
        if isinstance(step, str):
            if isinstance(data, dict) and step in data:
                walk(data[step], k + 1)
        elif step is WILDCARD:
            if isinstance(data, list):
                for item in data:
                    walk(item, k + 1)
        elif isinstance(data, list) and step < len(data):
            walk(data[step], k + 1)

    walk(payload, 0)
    return out


def simple_key(key: str) -> str | None:
    """The key itself when the path is one plain object key (the common, fast case), else None."""
    steps = parse_path(key)
    return steps[0] if len(steps) == 1 and isinstance(steps[0], str) else None


def value_getter(key: str) -> Callable[[Any], Sequence[Any]]:
    """`values_at(payload, key)` (flat) as a function, specialised for one plain key."""
    plain = simple_key(key)
    if plain is None:
        return lambda payload: values_at(payload, key)

    def get(payload: Any) -> Sequence[Any]:
        if type(payload) is not dict or plain not in payload:
            return ()
        value = payload[plain]
        return value if type(value) is list else (value,)

    return get


def _selector_tree(keys: list[str]) -> dict:
    tree: dict = {}
    for key in keys:
        *parents, last = parse_path(key)
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if node is True:  # a shorter path already selects everything below it
                break
        else:
            node[last] = True
    return tree


def _include(value: Any, tree: dict) -> Any:
    if isinstance(value, dict):
        return {k: (v if tree[k] is True else _include(v, tree[k])) for k, v in value.items() if k in tree}
    if isinstance(value, list):
        if WILDCARD not in tree:
            return []
        sub = tree[WILDCARD]
        return value if sub is True else [_include(v, sub) for v in value]
    return value


def _exclude(value: Any, tree: dict) -> Any:
    if isinstance(value, dict):
        return {k: (v if k not in tree else _exclude(v, tree[k])) for k, v in value.items() if tree.get(k) is not True}
    if isinstance(value, list):
        if WILDCARD not in tree:
            return value
        sub = tree[WILDCARD]
        return [] if sub is True else [_exclude(v, sub) for v in value]
    return value


def compile_payload_selector(with_payload: Any):
    """Turn Qdrant's `with_payload` (bool, [keys], {"include": [...]}, {"exclude": [...]}) into a function.

    The function maps a stored payload to what the response carries (None = no payload).
    """
    if hasattr(with_payload, "model_dump"):  # qdrant-client's PayloadSelectorInclude/Exclude
        with_payload = with_payload.model_dump(exclude_none=True)
    if with_payload is None or with_payload is False:
        return lambda payload: None
    if with_payload is True:
        return lambda payload: payload
    if isinstance(with_payload, list):
        keys, include = with_payload, True
    elif isinstance(with_payload, dict) and set(with_payload) == {"include"}:
        keys, include = with_payload["include"], True
    elif isinstance(with_payload, dict) and set(with_payload) == {"exclude"}:
        keys, include = with_payload["exclude"], False
    else:
        raise UsageError(f"Format error in JSON body: with_payload must be a bool, a list of keys, "
                         f"{{\"include\": [...]}} or {{\"exclude\": [...]}}, got {with_payload!r}")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise UsageError(f"Format error in JSON body: with_payload keys must be strings, got {keys!r}")
    tree = _selector_tree(keys)
    if include:
        return lambda payload: _include(payload, tree)
    return lambda payload: _exclude(payload, tree)
