"""`offline serve` and `offline search` on a directory that holds no offline index: exit 2 and a hint
to run `statevault offline pull --dir ...`; never a server with zero collections (an agent failing
over to it would be told every collection is gone)."""
from __future__ import annotations

import json

import pytest

from snapshots.errors import NotFoundError
from snapshots.offline import OfflineIndex, write_offline_collection
from snapshots.offline import serve as serve_module
from tests.cli_runner import run_cli


@pytest.fixture
def no_server(monkeypatch):
    started = []
    monkeypatch.setattr(serve_module, "run_server", lambda *a, **kw: started.append(a))
    return started


@pytest.mark.parametrize("state", ["empty", "missing", "only leftovers"])
def test_serve_refuses_a_directory_without_an_index(tmp_path, capsys, no_server, state):
    target = tmp_path / "offline"
    if state != "missing":
        target.mkdir()
    if state == "only leftovers":  # an interrupted pull's temp dir and a stray file are no collection
        (target / ".kb.tmp-0123456789ab").mkdir()
        (target / "notes.txt").write_text("x")
        (target / "kb").mkdir()  # no meta.json
    code, out, err = run_cli(capsys, "offline", "serve", "--dir", str(target), "--port", "0")
    assert code == 2 and no_server == []
    assert "serving" not in err
    assert f"statevault offline pull --dir {target}" in " ".join(err.split())


@pytest.mark.parametrize("state", ["empty", "missing"])
def test_search_points_at_offline_pull(tmp_path, capsys, state):
    target = tmp_path / "offline"
    if state == "empty":
        target.mkdir()
    code, out, err = run_cli(capsys, "offline", "search", "--dir", str(target), "--collection", "kb",
                             "--vector", "[1, 2]", "--json")
    assert code == 2
    doc = json.loads(out)
    assert doc["exit_code"] == 2 and f"statevault offline pull --dir {target}" in doc["hint"]
    assert "snapshots list" not in doc["hint"]
    code, out, err = run_cli(capsys, "offline", "search", "--dir", str(target), "--collection", "kb",
                             "--vector", "[1, 2]")
    assert code == 2 and "statevault offline pull --dir" in err and "snapshots list" not in err


def test_an_unknown_collection_names_the_ones_there(tmp_path, capsys):
    write_offline_collection(tmp_path, {"collection": "kb", "snapshot_id": "s", "snapshot_time": "t",
                                        "vectors": {"": {"size": 2, "distance": "Dot"}}},
                             [{"id": 1, "vector": [1.0, 0.0], "payload": {}}])
    code, out, err = run_cli(capsys, "offline", "search", "--dir", str(tmp_path), "--collection", "faq",
                             "--vector", "[1, 2]", "--json")
    doc = json.loads(out)
    assert code == 2 and doc["message"] == "Not found: Collection `faq` doesn't exist!"
    assert "has: kb" in doc["hint"] and "offline pull" in doc["hint"]
    code, out, err = run_cli(capsys, "offline", "search", "--dir", str(tmp_path), "--collection", "kb",
                             "--vector", "[1, 2]", "--json")
    assert code == 0 and json.loads(out)["result"][0]["id"] == 1


def test_the_app_itself_refuses_an_empty_index(tmp_path):
    with pytest.raises(NotFoundError, match="holds no collection"):
        serve_module.create_app(tmp_path)
    with pytest.raises(NotFoundError, match="does not exist"):
        OfflineIndex.open(tmp_path / "nope")
