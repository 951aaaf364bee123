"""Triggers, row-level security, policies and comments of a PostgreSQL table come back with it
(backup.sources.postgres_objects), against the session's real PostgreSQL server."""
from __future__ import annotations

import psycopg
import pytest

from restore.targets.postgres import PostgresTarget
from snapshots.errors import IncompatibleTargetError
from snapshots.repository import open_repository
from tests.integration.test_postgres_store import backup, execute, restore, scalar, schema_of, table_bytes
from tests.servers import unique_name

FUNCTIONS = """
CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.note := 'fired'; RETURN NEW; END $$;
CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO audit_log VALUES (TG_OP, NEW.id); RETURN NEW; END $$;
"""

TABLE = """
CREATE TABLE audit_log (op text, id int);
CREATE TABLE memories (id int PRIMARY KEY, owner text NOT NULL, labels text[] NOT NULL DEFAULT '{{}}', note text,
                       parent int CONSTRAINT memories_parent REFERENCES memories (id));
COMMENT ON CONSTRAINT memories_parent ON memories IS 'a memory refines another';
INSERT INTO memories SELECT g, CASE WHEN g % 2 = 0 THEN 'alice' ELSE 'bob' END,
                            ARRAY['l' || g], 'as backed up' FROM generate_series(1, 50) g;
-- each would change or copy the restored rows if it fired during the load
CREATE TRIGGER memories_stamp BEFORE INSERT OR UPDATE OF owner ON memories FOR EACH ROW EXECUTE FUNCTION stamp();
CREATE TRIGGER memories_audit AFTER INSERT ON memories FOR EACH ROW
    WHEN (NEW.labels <> '{{}}'::text[]) EXECUTE FUNCTION audit();
CREATE TRIGGER memories_paused BEFORE DELETE ON memories FOR EACH ROW EXECUTE FUNCTION stamp();
ALTER TABLE memories DISABLE TRIGGER memories_paused;
COMMENT ON TABLE memories IS 'the agent''s long-term memory';
COMMENT ON COLUMN memories.note IS 'free text {{kept}}';
ALTER TABLE memories SET (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.01);
CREATE UNIQUE INDEX memories_owner_id ON memories (owner, id);
ALTER TABLE memories REPLICA IDENTITY USING INDEX memories_owner_id;
COMMENT ON INDEX memories_owner_id IS 'the replica identity';
COMMENT ON CONSTRAINT memories_pkey ON memories IS 'one row per memory';
ALTER TABLE memories ENABLE ROW LEVEL SECURITY;
ALTER TABLE memories FORCE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON memories FOR SELECT TO {role} USING (owner = current_user);
CREATE POLICY no_bob ON memories AS RESTRICTIVE FOR ALL TO PUBLIC USING (owner <> 'mallory')
    WITH CHECK (owner <> 'mallory');
"""


@pytest.fixture(scope="module")
def _roles(pg_server):
    """Roles are server-wide and a policy in any database keeps its role alive: they are
    dropped at the end of the module, after every test's databases are gone."""
    names: list[str] = []
    yield names
    for name in names:
        execute(pg_server.url, f"DROP ROLE IF EXISTS {name}")


@pytest.fixture
def role(pg_server, _roles):
    name = unique_name("agent_reader")
    execute(pg_server.url, f"CREATE ROLE {name}")
    _roles.append(name)
    return name


@pytest.fixture
def target_url(pg_database):
    return pg_database("svobjects")


def _objects(url: str, table: str = "memories") -> dict:
    spec = schema_of(url, "public", table)
    return {k: spec[k] for k in ("triggers", "row_security", "policies", "comments", "storage_options",
                                 "replica_identity")}


def _populate(url: str, role: str) -> None:
    execute(url, FUNCTIONS)
    execute(url, TABLE.format(role=role))


def test_objects_are_captured_and_recreated_after_the_load(pg_url, target_url, file_repo_url, role):
    _populate(pg_url, role)
    captured = _objects(pg_url)
    assert [t["name"] for t in captured["triggers"]] == ["memories_audit", "memories_paused", "memories_stamp"]
    assert {t["name"]: t["enabled"] for t in captured["triggers"]}["memories_paused"] == "D"
    assert captured["row_security"] == {"enabled": True, "forced": True}
    assert {p["name"]: (p["permissive"], p["command"], p["roles"]) for p in captured["policies"]} == {
        "no_bob": (False, "ALL", ["public"]), "own_rows": (True, "SELECT", [role])}
    assert captured["comments"] == {"table": "the agent's long-term memory", "columns": {"note": "free text {kept}"},
                                    "indexes": {"memories_owner_id": "the replica identity"},
                                    "constraints": {"memories_parent": "a memory refines another",
                                                    "memories_pkey": "one row per memory"}}
    assert captured["storage_options"] == ["fillfactor=70", "autovacuum_vacuum_scale_factor=0.01"]
    assert captured["replica_identity"] == {"kind": "index", "index": "memories_owner_id"}

    repo = open_repository(file_repo_url, create=True)
    manifest, _ = backup(repo, pg_url, tables=["public.memories"])
    execute(target_url, FUNCTIONS + "CREATE TABLE audit_log (op text, id int);")
    [plan] = restore(target_url, repo, manifest)
    assert plan.notes == []
    # the triggers were created after the COPY: no row says 'fired', nothing was audited
    assert table_bytes(target_url, "memories", "id") == table_bytes(pg_url, "memories", "id")
    assert scalar(target_url, "SELECT count(*) FROM audit_log") == 0
    assert _objects(target_url) == captured
    # and they work for new rows
    execute(target_url, "INSERT INTO memories VALUES (100, 'carol', '{x}', 'new')")
    assert scalar(target_url, "SELECT note FROM memories WHERE id = 100") == "fired"
    assert scalar(target_url, "SELECT count(*) FROM audit_log") == 1

    # under another name in the same database (restore --into): on the copy, the live table keeps its own
    restore(pg_url, repo, manifest, into="public.memories_copy")
    renamed = {**captured, "replica_identity": {"kind": "index", "index": "memories_copy_owner_id"},
               "comments": {**captured["comments"],
                            "indexes": {"memories_copy_owner_id": "the replica identity"},
                            "constraints": {"memories_copy_parent": "a memory refines another",
                                            "memories_copy_pkey": "one row per memory"}}}
    assert _objects(pg_url, "memories_copy") == renamed  # its indexes are renamed with it
    assert _objects(pg_url) == captured


def test_a_swap_keeps_the_snapshots_objects(pg_url, file_repo_url, role):
    _populate(pg_url, role)
    captured = _objects(pg_url)
    repo = open_repository(file_repo_url, create=True)
    manifest, _ = backup(repo, pg_url, tables=["public.memories"])
    # a bad deploy: the triggers, a policy and the comments are gone, and rows changed
    execute(pg_url, "DROP TRIGGER memories_stamp ON memories; DROP TRIGGER memories_audit ON memories;"
                    "DROP POLICY own_rows ON memories; COMMENT ON TABLE memories IS NULL;"
                    "ALTER TABLE memories RESET (fillfactor); ALTER TABLE memories REPLICA IDENTITY DEFAULT;"
                    "ALTER TABLE memories NO FORCE ROW LEVEL SECURITY; DELETE FROM memories WHERE id > 40")
    # the live table is published (CDC): the swapped-in table must stay in its publications
    execute(pg_url, "CREATE PUBLICATION agent_cdc FOR TABLE memories;"
                    "CREATE PUBLICATION agent_inserts FOR TABLE memories (id, owner) WHERE (owner <> 'x') "
                    "WITH (publish = 'insert')")
    published = "SELECT pubname, attnames, rowfilter FROM pg_publication_tables WHERE tablename = 'memories' ORDER BY 1"
    with psycopg.connect(pg_url) as conn:
        before = conn.execute(published).fetchall()
    assert [r[0] for r in before] == ["agent_cdc", "agent_inserts"]
    [plan] = restore(pg_url, repo, manifest, mode="swap")
    assert any("come from the snapshot" in n for n in plan.notes)
    assert _objects(pg_url) == captured
    assert scalar(pg_url, "SELECT count(*) FROM memories") == 50
    with psycopg.connect(pg_url) as conn:
        assert conn.execute(published).fetchall() == before
        assert conn.execute("SELECT count(*) FROM pg_publication_rel").fetchone()[0] == 2  # no stale entries


def test_missing_function_or_role_skips_that_object_with_a_note(pg_url, target_url, file_repo_url, role):
    _populate(pg_url, role)
    repo = open_repository(file_repo_url, create=True)
    manifest, _ = backup(repo, pg_url, tables=["public.memories"])
    execute(pg_url, f"DROP TABLE memories; DROP ROLE {role}")  # the role is gone from the whole server

    target = PostgresTarget(target_url)  # a fresh database: no trigger functions either
    try:
        [plan] = target.plan(manifest, only=[], into=None, mode="new")
    finally:
        target.close()
    notes = " | ".join(plan.notes)
    for name in ("memories_audit", "memories_paused", "memories_stamp"):
        assert f"trigger {name} not recreated: its function public." in notes
    assert f"policy own_rows not recreated: role(s) {role} do not exist" in notes
    assert "policy no_bob" not in notes  # PUBLIC always exists

    restore(target_url, repo, manifest)  # verified by read-back inside
    got = _objects(target_url)
    assert got["triggers"] == []
    assert [p["name"] for p in got["policies"]] == ["no_bob"]
    assert got["row_security"] == {"enabled": True, "forced": True}  # stricter without the policy, never looser
    assert got["comments"]["table"] == "the agent's long-term memory"


def test_replace_into_the_live_table_does_not_fire_its_triggers(pg_url, file_repo_url, role):
    _populate(pg_url, role)
    execute(pg_url, "CREATE TRIGGER memories_always BEFORE INSERT ON memories FOR EACH ROW EXECUTE FUNCTION stamp();"
                    "ALTER TABLE memories ENABLE ALWAYS TRIGGER memories_always")
    before = _objects(pg_url)
    repo = open_repository(file_repo_url, create=True)
    manifest, _ = backup(repo, pg_url, tables=["public.memories"])
    snap = table_bytes(pg_url, "memories", "id")
    execute(pg_url, "SET search_path = public; DELETE FROM memories WHERE id > 10; DELETE FROM audit_log")

    [plan] = restore(pg_url, repo, manifest, mode="replace")  # verified by read-back inside
    assert plan.details["method"] == "truncate"
    assert any("live triggers memories_always, memories_audit, memories_stamp are switched off" in n
               for n in plan.notes)
    assert table_bytes(pg_url, "memories", "id") == snap  # no 'fired' notes
    assert scalar(pg_url, "SELECT count(*) FROM audit_log") == 0
    assert _objects(pg_url) == before  # every trigger back in its state: O, D and A
    execute(pg_url, "SET search_path = public; INSERT INTO memories VALUES (100, 'carol', '{x}', 'new')")
    assert scalar(pg_url, "SELECT note FROM memories WHERE id = 100") == "fired"


def test_a_role_that_row_level_security_applies_to_is_refused_before_writing(pg_url, target_url, file_repo_url,
                                                                              role, _roles, pg_server):
    """COPY FROM refuses such a table and the read-back cannot see past the policies: exit 2
    up front, not a failed load or an unverifiable restore. The restoring role is set through
    the URL (libpq options), so no login or password is needed on any server."""
    _populate(pg_url, role)  # memories: RLS enabled and forced
    repo = open_repository(file_repo_url, create=True)
    manifest, _ = backup(repo, pg_url, tables=["public.memories"])
    restorer = unique_name("restorer")
    _roles.append(restorer)
    dbname = target_url.rsplit("/", 1)[1].split("?")[0]
    execute(pg_server.url, f"CREATE ROLE {restorer} NOBYPASSRLS")
    execute(target_url, f"GRANT CREATE ON DATABASE {dbname} TO {restorer}; GRANT ALL ON SCHEMA public TO {restorer}")
    as_restorer = target_url + ("&" if "?" in target_url else "?") + f"options=-c%20role%3D{restorer}"
    assert scalar(as_restorer, "SELECT current_user") == restorer

    target = PostgresTarget(as_restorer)
    try:
        with pytest.raises(IncompatibleTargetError, match="forces row-level security on its owner"):
            target.plan(manifest, only=[], into=None, mode="new")
        # into a live table it does not own, with RLS on (not forced): refused too
        execute(target_url, "CREATE TABLE memories (id int PRIMARY KEY, owner text NOT NULL, labels text[] NOT NULL "
                            "DEFAULT '{}', note text); ALTER TABLE memories ENABLE ROW LEVEL SECURITY")
        with pytest.raises(IncompatibleTargetError, match="this role does not own it"):
            target.plan(manifest, only=[], into=None, mode="replace")
    finally:
        target.close()
    assert scalar(target_url, "SELECT count(*) FROM memories") == 0  # nothing was written
    execute(target_url, f"REVOKE ALL ON SCHEMA public FROM {restorer}; REVOKE ALL ON DATABASE {dbname} FROM {restorer}")
