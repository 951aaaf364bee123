"""docs/runbook.md cannot rot: its commands are well-formed, and every one of them is run.

The scenario tests (test_runbook_vector.py, test_runbook_stores.py, test_runbook_ops.py) run
the runbook's commands through `Runbook.run`, which only accepts commands that are verbatim in
the runbook and records them. The last test of the session (tests/e2e/conftest.py orders it)
fails listing every runbook command that no scenario ran.
"""
from __future__ import annotations

import ast
import re
import shlex

import pytest

from tests.e2e import runbook_harness as rh


def test_runbook_has_commands_for_every_scenario():
    text = rh.RUNBOOK.read_text(encoding="utf-8")
    commands = rh.runbook_commands(text)
    assert len(commands) >= 40
    headings = re.findall(r"^## (\d+)\. ", text, flags=re.M)
    assert headings == [str(i) for i in range(1, 11)]
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    for section in sections:
        title = section.splitlines()[0]
        if title[0].isdigit() or title.startswith("Before an incident"):
            assert rh.runbook_commands(section), f"section {title!r} has no runnable command"


def test_placeholders_are_the_documented_substitution_table():
    text = rh.RUNBOOK.read_text(encoding="utf-8")
    table = text.split("### Placeholders", 1)[1].split("\n### ", 1)[0]
    documented = set()
    for row in table.splitlines():
        if row.startswith("| `"):
            documented.update(re.findall(r"`([<$][^`]+)`", row.split("|")[1]))
    assert documented == set(rh.PLACEHOLDERS)
    used = {p for c in rh.runbook_commands(text) for p in rh.PLACEHOLDERS if p in c}
    assert used == set(rh.PLACEHOLDERS), f"documented but unused: {set(rh.PLACEHOLDERS) - used}"
    for command in rh.runbook_commands(text):
        stripped = command
        for p in rh.PLACEHOLDERS:
            stripped = stripped.replace(p, "X")
        assert not re.search(r"<[a-z][a-z-]*>|\$[A-Z]+", stripped), f"undocumented placeholder in {command!r}"
        assert "-c " not in command and "--config" not in command, "the config comes from STATEVAULT_CONFIG"
        shlex.split(command)  # quoting is valid


def test_substitution_refuses_missing_or_unknown_values():
    with pytest.raises(AssertionError, match="needs"):
        rh.substitute("statevault offline pull --source knowledge --dir $DIR", {})
    with pytest.raises(AssertionError, match="unknown"):
        rh.substitute("statevault locks list", {"bogus": 1})
    assert rh.substitute("statevault restore <pre-restore-id> --source memory --mode replace --yes",
                         {"pre_restore_id": "20261126T125109Z-f63f65b5"}) == [
        "restore", "20261126T125109Z-f63f65b5", "--source", "memory", "--mode", "replace", "--yes"]


def test_runbook_refuses_commands_it_does_not_contain(tmp_path):
    sv = rh.Runbook(tmp_path / "statevault.toml", tmp_path)
    with pytest.raises(AssertionError, match="not a command of docs/runbook.md"):
        sv.run("statevault snapshots list --source nosuchsource")


def test_readme_links_the_runbook():
    readme = (rh.ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/runbook.md)" in readme


def test_every_runbook_command_is_run_by_a_scenario(request):
    scenario_files = [rh.ROOT / "tests" / "e2e" / name for name in rh.SCENARIO_MODULES]
    defined = {f"tests/e2e/{f.name}::{name}" for f in scenario_files
               for name in re.findall(r"^def (test_\w+)", f.read_text(encoding="utf-8"), flags=re.M)}
    selected = {nodeid for nodeid in rh.SELECTED}
    # always: every runbook command is a string literal, word for word, of some scenario test
    # (ast joins implicitly concatenated literals, so a command split over lines counts)
    literals = {node.value for f in scenario_files for node in ast.walk(ast.parse(f.read_text(encoding="utf-8")))
                if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    unwritten = [c for c in rh.runbook_commands() if c not in literals]
    assert not unwritten, "runbook commands no scenario test contains:\n  " + "\n  ".join(unwritten)
    if defined <= selected:
        # a full run: every one of them was also executed
        missing = [c for c in rh.runbook_commands() if c not in rh.EXECUTED]
        assert not missing, "runbook commands no scenario test ran:\n  " + "\n  ".join(missing)
