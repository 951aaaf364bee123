"""The runbook scenarios' agent state, and ordering: the runbook coverage check runs last.

`agent_env`: PostgreSQL memories (pg_url), Redis histories with TTLs (redis_url), two Qdrant
local-mode collections (qdrant_path), an empty file:// repository, a config naming them as
`memory`, `history` and `knowledge`, and a `Runbook` bound to that config.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e import runbook_harness as rh

COVERAGE_TEST = "test_every_runbook_command_is_run_by_a_scenario"


def pytest_collection_modifyitems(session, config, items):
    rh.SELECTED.clear()
    rh.SELECTED.update(i.nodeid for i in items if Path(str(i.fspath)).name in rh.SCENARIO_MODULES)
    last = [i for i in items if i.name == COVERAGE_TEST]
    if last:
        items[:] = [i for i in items if i.name != COVERAGE_TEST] + last


@dataclass
class AgentEnv:
    sv: rh.Runbook
    tmp: Path
    repo: Path
    pg_url: str
    redis_url: str
    qdrant_path: Path


@pytest.fixture
def agent_env(tmp_path, pg_url, redis_url, qdrant_path) -> AgentEnv:
    rh.seed_postgres(pg_url)
    rh.seed_redis(redis_url)
    rh.seed_qdrant(qdrant_path)
    repo = tmp_path / "repo"
    config = rh.write_config(tmp_path / "statevault.toml", repo, pg_url, redis_url, qdrant_path)
    work = tmp_path / "work"
    work.mkdir()
    return AgentEnv(rh.Runbook(config, work), tmp_path, repo, pg_url, redis_url, qdrant_path)
