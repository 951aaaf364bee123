"""Ours-versus-reference timing for the store benchmarks (bench_postgres/redis/qdrant/rss.py).

Each bench measures our command and the reference command in the same run, on the same data,
`repeat` times alternating the two, and keeps the best time of each (the least disturbed by
other load on the machine). A Comparison prints as one line the test suite and people read:

    ratio backup: ours 2.10 s / pg_dump -Fc 5.60 s = 0.38x (goal <= 0.40x: met)

The load average is printed before and after: on a shared 2-core machine a run under load
is noisy, so the numbers are only comparable when the load was similar.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass
class Comparison:
    name: str                 # "backup", "restore", ...
    reference: str            # the reference command, e.g. "pg_dump -Fc"
    goal: float | None        # ours/reference must be at most this; None: reported, no goal
    ours: list[float] = field(default_factory=list)       # seconds (or `unit`), one per repetition
    theirs: list[float] = field(default_factory=list)
    unit: str = "s"

    @property
    def ours_s(self) -> float:
        return min(self.ours)

    @property
    def reference_s(self) -> float:
        return min(self.theirs)

    @property
    def ratio(self) -> float:
        return self.ours_s / self.reference_s

    @property
    def median_ratio(self) -> float:
        """The median of the runs' own ratios (ours[i] / theirs[i]): steadier than the ratio of
        the two bests when one side has a lucky run."""
        import statistics

        return statistics.median(a / b for a, b in zip(self.ours, self.theirs))

    @property
    def met(self) -> bool | None:
        return None if self.goal is None else self.ratio <= self.goal

    def line(self) -> str:
        u = self.unit
        verdict = ("no goal: reported" if self.goal is None
                   else f"goal <= {self.goal:.2f}x: {'met' if self.met else 'MISSED'}")
        return (f"ratio {self.name}: ours {self.ours_s:.2f} {u} / {self.reference} {self.reference_s:.2f} {u} = "
                f"{self.ratio:.2f}x ({verdict})")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(ours_s=self.ours_s, reference_s=self.reference_s, ratio=round(self.ratio, 4), met=self.met,
                 median_ratio=round(self.median_ratio, 4))
        return d


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def header(title: str, params: dict[str, Any]) -> None:
    print(f"== {title}  ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.python_implementation()} "
          f"{platform.python_version()}, {load()})")
    print("   " + ", ".join(f"{k}={v}" for k, v in params.items()))
    sys.stdout.flush()


def note(text: str) -> None:
    print("   " + text)
    sys.stdout.flush()


def report(title: str, params: dict[str, Any], comparisons: list[Comparison], info: dict[str, Any],
           as_json: bool) -> None:
    """Print the comparisons (and `info`), as lines or as one JSON object."""
    if as_json:
        print(json.dumps({"bench": title, "params": params, "load_after": os.getloadavg(),
                          "comparisons": [c.to_dict() for c in comparisons], "info": info}, default=str))
        return
    for key, value in info.items():
        note(f"{key}: {value}")
    for c in comparisons:
        runs = ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(c.ours, c.theirs))
        note(f"{c.name}: ours/reference per run ({c.unit}): {runs}; median of the runs' ratios "
             f"{c.median_ratio:.2f}x")
    for c in comparisons:
        print(c.line())
    note(f"after: {load()}")


def peak_rss_mib(field: str = "VmHWM") -> float:
    """This process's peak resident set size so far (VmHWM; VmRSS for the current one), MiB.

    Read from /proc: ru_maxrss would also do in a parent for its children, but inside a child it
    starts at the parent's peak, because Linux keeps it across fork and execve."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- the benches' data: one definition, used by the store benches and bench_levels.py ------

def random_text(rng, size: int, alphabet: bytes = b"abcdefghijklmnopqrstuvwxyz  ") -> str:
    """`size` random characters of `alphabet` (its spaces make word breaks)."""
    import numpy as np

    letters = np.frombuffer(alphabet, dtype=np.uint8)
    return bytes(letters[rng.integers(0, len(letters), size=size)]).decode()


def zipf_text(rng) -> str:
    """~2.5 MB of words of a 4000-word vocabulary drawn with a Zipf law (memory-like text)."""
    letters = b"abcdefghijklmnopqrstuvwxyz"
    vocab = [random_text(rng, int(n), letters) for n in rng.integers(2, 11, size=4000)]
    return " ".join(vocab[i] for i in rng.zipf(1.3, size=400_000) % len(vocab))


def memory_row(row_id: int, body: str, user: int, score: float, turn: int, stamp: str) -> str:
    """One COPY text line of bench_postgres's `memories` table."""
    return (f'{row_id}\t{body}\t{{"user": "u{user}", "score": {score:.4f}, '
            f'"kind": "{("fact", "preference", "episode")[user % 3]}", "turn": {turn}}}\t{stamp}Z\n')


def history_message(i: int, content: str) -> bytes:
    """One conversation turn as bench_redis stores it (~1 KB of JSON)."""
    import orjson

    return orjson.dumps({"user": f"u{i}", "role": ("user", "assistant")[i % 2], "turn": i % 40,
                         "content": content, "ts": 1764000000 + i})


def kb_payload(i: int, text: str) -> dict:
    """A knowledge-base point's payload as bench_qdrant stores it (~250 bytes)."""
    return {"text": text, "source": f"doc-{i // 20}", "chunk": i % 20,
            "tags": ["kb", ("faq", "manual", "policy")[i % 3]], "lang": "en"}


def dir_size(path) -> int:
    """Bytes of every file below `path` (a repository's size on disk)."""
    from pathlib import Path

    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def store_bench_args(ap, size_flag: str, default: int):
    """The arguments every store bench takes: its data size, --repeat, --seed, --json."""
    ap.add_argument(size_flag, type=int, default=default)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each side; the best is kept")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    return ap
