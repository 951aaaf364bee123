"""What a table carries beyond its columns, keys and indexes: triggers, row-level security
and its policies, comments, storage parameters and replica identity (part of the item schema;
see postgres_schema.describe_table).

pg_dump users expect these back when a table is recreated: an `updated_at` trigger or a
tenant-isolation policy silently missing after a swap restore changes how the agent's memory
behaves. They are captured in the backup's own transaction, printed by the catalog with an
empty search_path (so every name is schema-qualified), and replayed after the load by
restore.targets.postgres (a trigger created before the COPY would fire for every restored row).

What they depend on is NOT in the snapshot: trigger functions and the roles a policy names
belong to the database, not the table. A restore checks they exist and, when one is missing,
skips that trigger or policy with a plan note saying what to create. A skipped policy leaves
row-level security stricter, never looser: with RLS enabled and no policy, nothing is visible
to roles it applies to.

    "triggers": [{"name", "timing": "BEFORE UPDATE OF body", "body": "FOR EACH ROW EXECUTE
                  FUNCTION public.touch()", "constraint": false, "enabled": "O", "function":
                  "public.touch()"}]
    "row_security": {"enabled": true, "forced": false}
    "policies": [{"name", "permissive": true, "command": "ALL|SELECT|INSERT|UPDATE|DELETE",
                  "roles": ["public" | role name], "using": expr | null, "check": expr | null}]
    "comments": {"table": text | null, "columns": {column: text}, "indexes": {index: text},
                 "constraints": {constraint: text}}
    "storage_options": ["fillfactor=70", "autovacuum_vacuum_scale_factor=0.01", ...] (reloptions)
    "replica_identity": {"kind": "default|nothing|full|index", "index": name | null}

`timing` and `body` are the parts of pg_get_triggerdef around `ON <table>`, so the trigger
can be recreated on a table with another name or schema (restore --into, swap staging).
`enabled` is pg_trigger.tgenabled: O (origin, the default), D (disabled), R (replica), A (always).
Snapshots taken before these keys existed restore as before: none of them.
"""
from __future__ import annotations

from typing import Any

from snapshots.errors import SourceError

_TRIGGERS = """
SELECT t.tgname, pg_catalog.format('%%I', t.tgname), pg_catalog.pg_get_triggerdef(t.oid), t.tgenabled,
       t.tgfoid::regprocedure::text, t.tgconstraint <> 0
FROM pg_catalog.pg_trigger t
WHERE t.tgrelid = %s AND NOT t.tgisinternal{parent}
ORDER BY t.tgname"""

_POLICIES = """
SELECT p.polname, p.polpermissive, p.polcmd,
       ARRAY(SELECT CASE WHEN r = 0 THEN 'public' ELSE (SELECT rolname FROM pg_catalog.pg_roles WHERE oid = r) END
             FROM unnest(p.polroles) r ORDER BY 1),
       pg_catalog.pg_get_expr(p.polqual, p.polrelid), pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid)
FROM pg_catalog.pg_policy p WHERE p.polrelid = %s ORDER BY p.polname"""

_COMMANDS = {"*": "ALL", "r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE"}
_IDENTITY = {"d": "default", "n": "nothing", "f": "full", "i": "index"}


def describe_objects(conn, oid: int, qualified: str) -> dict[str, Any]:
    """The table's triggers, row-level security, policies and comments (module docstring).
    `qualified`: the table's name as the catalog prints it (postgres_schema.quote_qualified)."""
    # a partition's clones of its parent's triggers (tgparentid, PostgreSQL 13+) are the
    # parent's: recreated with it, not with the partition (as pg_dump does)
    parent = " AND t.tgparentid = 0" if conn.info.server_version >= 130000 else ""
    triggers = []
    for name, quoted, definition, enabled, function, constraint in conn.execute(
            _TRIGGERS.format(parent=parent), (oid,)):
        timing, body = _split_trigger(definition, quoted, qualified, constraint)
        triggers.append({"name": name, "timing": timing, "body": body, "constraint": bool(constraint),
                         "enabled": enabled, "function": function})
    policies = [{"name": name, "permissive": bool(permissive), "command": _COMMANDS[cmd], "roles": list(roles),
                 "using": using, "check": check}
                for name, permissive, cmd, roles, using, check in conn.execute(_POLICIES, (oid,))]
    enabled, forced, table_comment, options, identity = conn.execute(
        "SELECT relrowsecurity, relforcerowsecurity, pg_catalog.obj_description(oid, 'pg_class'), reloptions, "
        "relreplident FROM pg_catalog.pg_class WHERE oid = %s", (oid,)).fetchone()
    identity_index = None
    if identity == "i":
        identity_index = conn.execute("SELECT ic.relname FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class ic "
                                      "ON ic.oid = i.indexrelid WHERE i.indrelid = %s AND i.indisreplident",
                                      (oid,)).fetchone()[0]
    columns = dict(conn.execute(
        """SELECT a.attname, d.description FROM pg_catalog.pg_description d
           JOIN pg_catalog.pg_attribute a ON a.attrelid = d.objoid AND a.attnum = d.objsubid
           WHERE d.classoid = 'pg_catalog.pg_class'::regclass AND d.objoid = %s AND d.objsubid > 0
             AND NOT a.attisdropped ORDER BY a.attnum""", (oid,)).fetchall())
    indexes = dict(conn.execute(
        """SELECT ic.relname, d.description FROM pg_catalog.pg_index i
           JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
           JOIN pg_catalog.pg_description d ON d.objoid = ic.oid AND d.classoid = 'pg_catalog.pg_class'::regclass
           WHERE i.indrelid = %s ORDER BY 1""", (oid,)).fetchall())
    constraints = dict(conn.execute(
        """SELECT c.conname, d.description FROM pg_catalog.pg_constraint c
           JOIN pg_catalog.pg_description d ON d.objoid = c.oid AND d.classoid = 'pg_catalog.pg_constraint'::regclass
           WHERE c.conrelid = %s ORDER BY 1""", (oid,)).fetchall())
    return {"triggers": triggers, "row_security": {"enabled": bool(enabled), "forced": bool(forced)},
            "policies": policies,
            "comments": {"table": table_comment, "columns": columns, "indexes": indexes, "constraints": constraints},
            "storage_options": list(options or []),
            "replica_identity": {"kind": _IDENTITY[identity], "index": identity_index}}


def _split_trigger(definition: str, quoted_name: str, qualified_table: str, constraint: bool) -> tuple[str, str]:
    """(timing, body) of `CREATE [CONSTRAINT] TRIGGER name <timing> ON <table> <body>`."""
    prefix = f"CREATE {'CONSTRAINT ' if constraint else ''}TRIGGER {quoted_name} "
    on = f" ON {qualified_table} "
    cut = definition.find(on, len(prefix))
    if not definition.startswith(prefix) or cut < 0:
        raise SourceError(f"unexpected trigger definition, cannot recreate it: {definition}")
    return definition[len(prefix):cut], definition[cut + len(on):]
