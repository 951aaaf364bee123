"""What a PostgreSQL restore must know and carry over about the live database.

- Foreign keys touching a table: a TRUNCATE or a swap cannot proceed while other tables
  reference it, so they are dropped, and re-added NOT VALID in the same transaction once the
  new rows are in (cheap, no scan under the exclusive lock; still enforced for new writes).
  `validate` checks them afterwards, under a lock that does not block readers or writers.
- Privileges and owner of a table that is recreated or swapped in, so the agent's role can
  still read its memory afterwards, and its publication memberships (with their column lists
  and row filters), so logical replication and CDC go on seeing it.
- Views depending on a table (a recreate or swap would drop or detach them: refused in plan).
- Types the snapshot needs (enum labels, extensions), checked before anything is written.
- Triggers of a live table that is loaded into (replace with the same columns): switched off
  for the load and back to their exact state after it, in the same transaction, as
  `pg_restore --disable-triggers` (a restore puts rows back; an audit or `updated_at` trigger
  firing for them would change them and fail the verification).
- Trigger functions and policy roles a recreated table needs: missing ones are skipped, with
  a plan note (the table and its rows do not depend on them).
- Sequence values: owned sequences are set to the snapshot's value; shared sequences are only
  ever moved forward, since other tables draw from them too.
- What the restore itself created (`Created`): new tables and the schemas, types, extensions
  and shared sequences they needed, so a failed restore can drop them again.
"""
from __future__ import annotations

from typing import Any

from psycopg import sql

from restore.targets import postgres_ddl as ddl
from restore.targets.postgres_ddl import add_constraint, comment_on_constraint
from snapshots.errors import StatevaultError

_FKS = """
SELECT c.conname, pg_catalog.pg_get_constraintdef(c.oid), c.conrelid,
       pg_catalog.format('%%I.%%I', n.nspname, r.relname), pg_catalog.obj_description(c.oid, 'pg_constraint')
FROM pg_catalog.pg_constraint c
JOIN pg_catalog.pg_class r ON r.oid = c.conrelid JOIN pg_catalog.pg_namespace n ON n.oid = r.relnamespace
WHERE c.contype = 'f' AND c.conparentid = 0 AND (c.conrelid = %(t)s OR c.confrelid = %(t)s)
ORDER BY 4, 1"""


def foreign_keys_touching(conn, oid: int, *, inbound_only: bool = False,
                          skip_tables: frozenset[int] = frozenset()) -> list[dict[str, Any]]:
    """FKs from or to table `oid` (only those from other tables with inbound_only), except
    those declared on `skip_tables` (tables about to be dropped along with their constraints)."""
    out = []
    for name, definition, conrelid, table_sql, comment in conn.execute(_FKS, {"t": oid}):
        if (inbound_only and conrelid == oid) or conrelid in skip_tables:
            continue
        out.append({"table": table_sql, "name": name, "definition": definition, "comment": comment})
    return out


def detach(conn, fks: list[dict[str, Any]]) -> None:
    for fk in fks:
        conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(sql.SQL(fk["table"]),
                                                                          sql.Identifier(fk["name"])))


def reattach(conn, fks: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Re-add detached FKs NOT VALID; returns (table, constraint) pairs for `validate`."""
    for fk in fks:
        conn.execute(add_constraint(sql.SQL(fk["table"]), fk["name"], fk["definition"], not_valid=True))
        if fk.get("comment") is not None:  # dropped with the constraint by `detach`
            conn.execute(comment_on_constraint(sql.SQL(fk["table"]), fk["name"], fk["comment"]))
    return [(fk["table"], fk["name"]) for fk in fks]


def validate(conn, pending: list[tuple[str, str]]) -> list[str]:
    """VALIDATE each constraint in its own transaction; returns the failures, one line each
    (the constraint stays NOT VALID: enforced for new rows, violated by some restored ones)."""
    import psycopg

    failures = []
    for table, name in pending:
        try:
            with conn.transaction():
                conn.execute(sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(sql.SQL(table),
                                                                                    sql.Identifier(name)))
        except psycopg.Error as exc:
            detail = exc.diag.message_detail or exc.diag.message_primary or type(exc).__name__
            failures.append(f"{table} {name}: {detail}")
    return failures


# --------------------------------------------------------------------------- privileges, views

_PRIVILEGES = """
SELECT pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(c.relowner)),
       pg_catalog.pg_get_userbyid(c.relowner) = current_user,
       ARRAY(SELECT ARRAY[CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                               ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(a.grantee)) END,
                          a.privilege_type, a.is_grantable::text]
             FROM pg_catalog.aclexplode(c.relacl) a WHERE a.grantee <> c.relowner)
FROM pg_catalog.pg_class c WHERE c.oid = %s"""


_SEQUENCE_PRIVILEGES = """
SELECT a.attname,
       ARRAY(SELECT ARRAY[CASE WHEN x.grantee = 0 THEN 'PUBLIC'
                               ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(x.grantee)) END,
                          x.privilege_type, x.is_grantable::text]
             FROM pg_catalog.aclexplode(s.relacl) x WHERE x.grantee <> s.relowner)
FROM pg_catalog.pg_depend d
JOIN pg_catalog.pg_class s ON s.oid = d.objid AND s.relkind = 'S'
JOIN pg_catalog.pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.refclassid = 'pg_catalog.pg_class'::regclass
  AND d.refobjid = %s AND d.deptype IN ('a', 'i')"""


def privileges(conn, oid: int) -> dict[str, Any]:
    """Owner and grants of a table and of the sequences its columns own (an agent's role
    needs USAGE on them to insert), and the publications that name the table (logical
    replication / CDC would stop seeing a table dropped and created again)."""
    owner, mine, grants = conn.execute(_PRIVILEGES, (oid,)).fetchone()
    sequences = {col: [tuple(g) for g in seq_grants or []]
                 for col, seq_grants in conn.execute(_SEQUENCE_PRIVILEGES, (oid,))}
    query = _PUBLICATIONS if conn.info.server_version >= 150000 else _PUBLICATIONS_14
    return {"owner": owner, "owner_is_me": bool(mine), "grants": [tuple(g) for g in grants or []],
            "sequences": sequences, "publications": [tuple(r) for r in conn.execute(query, (oid,))]}


# (publication, column list or NULL, row filter or NULL); lists and filters exist from PostgreSQL 15
_PUBLICATIONS = """
SELECT p.pubname,
       CASE WHEN pr.prattrs IS NOT NULL THEN
            ARRAY(SELECT a.attname FROM unnest(pr.prattrs::int2[]) WITH ORDINALITY k(n, i)
                  JOIN pg_catalog.pg_attribute a ON a.attrelid = pr.prrelid AND a.attnum = k.n ORDER BY k.i) END,
       pg_catalog.pg_get_expr(pr.prqual, pr.prrelid)
FROM pg_catalog.pg_publication_rel pr JOIN pg_catalog.pg_publication p ON p.oid = pr.prpubid
WHERE pr.prrelid = %s ORDER BY 1"""
_PUBLICATIONS_14 = """
SELECT p.pubname, NULL, NULL
FROM pg_catalog.pg_publication_rel pr JOIN pg_catalog.pg_publication p ON p.oid = pr.prpubid
WHERE pr.prrelid = %s ORDER BY 1"""


def _grant(conn, kind: str, target: sql.Composable, grants: list[tuple]) -> None:
    for grantee, privilege, grantable in grants:
        option = " WITH GRANT OPTION" if grantable == "true" else ""
        conn.execute(sql.SQL(f"GRANT {privilege} ON {kind} {{}} TO {grantee}{option}").format(target))


def apply_privileges(conn, table: sql.Identifier, privs: dict[str, Any]) -> list[str]:
    """GRANT what the old table (and its owned sequences) granted; hand it to the old owner
    if we may. Returns notes for the plan."""
    import psycopg

    _grant(conn, "TABLE", table, privs["grants"])
    table_sql = table.as_string(conn)
    for column, grants in privs["sequences"].items():
        seq = serial_sequence(conn, table_sql, column) if grants else None
        if seq is not None:
            _grant(conn, "SEQUENCE", sql.SQL(seq), grants)
    notes = []
    for name, columns, where in privs.get("publications", []):
        stmt = sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(sql.Identifier(name), table)
        if columns is not None:
            stmt += sql.SQL(" ({})").format(sql.SQL(", ").join(sql.Identifier(c) for c in columns))
        if where is not None:
            stmt += sql.SQL(" WHERE ({})").format(sql.SQL(where))
        try:
            with conn.transaction():  # a savepoint: a refused membership must not undo the restore
                conn.execute(stmt)
        except psycopg.Error as exc:
            notes.append(f"could not add the restored table to publication {name} again "
                         f"({exc.diag.message_primary or type(exc).__name__}): add it by hand")
    if privs["owner_is_me"]:
        return notes
    try:
        with conn.transaction():  # a savepoint: a refused OWNER TO must not undo the restore
            conn.execute(sql.SQL("ALTER TABLE {} OWNER TO " + privs["owner"]).format(table))
    except psycopg.Error:
        notes.append(f"could not give the restored table to its previous owner {privs['owner']}")
    return notes


def dependent_views(conn, oid: int) -> list[str]:
    rows = conn.execute(
        """SELECT DISTINCT pg_catalog.format('%%I.%%I', vn.nspname, v.relname) FROM pg_catalog.pg_depend d
           JOIN pg_catalog.pg_rewrite rw ON rw.oid = d.objid JOIN pg_catalog.pg_class v ON v.oid = rw.ev_class
           JOIN pg_catalog.pg_namespace vn ON vn.oid = v.relnamespace
           WHERE d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.refclassid = 'pg_catalog.pg_class'::regclass
             AND d.refobjid = %s AND v.oid <> %s ORDER BY 1""", (oid, oid)).fetchall()
    return [r[0] for r in rows]


# --------------------------------------------------------------------------- types

def check_types(conn, spec: dict[str, Any]) -> tuple[list[dict], list[str], list[str]]:
    """(enums to create, extensions to create, problems) for the snapshot's column types."""
    import psycopg

    enums, problems = [], []
    for enum in spec["enums"]:
        row = conn.execute(
            """SELECT t.typtype, ARRAY(SELECT e.enumlabel FROM pg_catalog.pg_enum e WHERE e.enumtypid = t.oid)
               FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
               WHERE n.nspname = %s AND t.typname = %s""", (enum["schema"], enum["name"])).fetchone()
        name = f"{enum['schema']}.{enum['name']}"
        if row is None:
            enums.append(enum)
        elif row[0] != "e":
            problems.append(f"type {name} exists on the target but is not an enum")
        elif set(enum["labels"]) - set(row[1]):
            missing = ", ".join(sorted(set(enum["labels"]) - set(row[1])))
            problems.append(f"enum {name} on the target lacks the labels {missing}")
    extensions = []
    if spec["extensions"]:
        have = {r[0] for r in conn.execute("SELECT extname FROM pg_catalog.pg_extension")}
        available = {r[0] for r in conn.execute("SELECT name FROM pg_catalog.pg_available_extensions")}
        for ext in spec["extensions"]:
            if ext in have:
                continue
            if ext in available:
                extensions.append(ext)
            else:
                problems.append(f"extension {ext} (providing a column type) is not available on the target")
    if not enums and not extensions:
        for col in spec["columns"]:
            try:
                found = conn.execute("SELECT pg_catalog.to_regtype(%s)", (col["type"],)).fetchone()[0]
            except psycopg.Error:
                found = None
            if found is None:
                problems.append(f"column {col['name']}: type {col['type']} does not exist on the target")
    return enums, extensions, problems


def missing_dependencies(conn, spec: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(triggers, policies, notes): the snapshot's triggers whose function and policies whose
    roles do not exist on the target. They are skipped, each with a note saying what to create
    (functions and roles belong to the database, not to the table's snapshot)."""
    triggers, policies, notes = [], [], []
    for trigger in spec.get("triggers", []):
        if conn.execute("SELECT pg_catalog.to_regprocedure(%s)", (trigger["function"],)).fetchone()[0] is None:
            triggers.append(trigger["name"])
            notes.append(f"trigger {trigger['name']} not recreated: its function {trigger['function']} does not "
                         "exist on the target (create the function, then the trigger)")
    wanted = sorted({r for p in spec.get("policies", []) for r in p["roles"] if r != "public"})
    have = {r[0] for r in conn.execute("SELECT rolname FROM pg_catalog.pg_roles WHERE rolname = ANY(%s)",
                                       (wanted,))} if wanted else set()
    for policy in spec.get("policies", []):
        lacking = [r for r in policy["roles"] if r != "public" and r not in have]
        if lacking:
            policies.append(policy["name"])
            notes.append(f"policy {policy['name']} not recreated: role(s) {', '.join(lacking)} do not exist on "
                         "the target (row-level security stays on, so those rows stay hidden, never exposed)")
    return triggers, policies, notes


def row_security_problem(conn, spec: dict[str, Any], live_oid: int | None) -> str | None:
    """Why row-level security would stop this role from loading the table and reading it back
    (COPY FROM refuses a table whose policies apply to the role; the read-back, with
    row_security off, fails rather than see a subset), or None. Policies apply to a role that
    is not superuser or BYPASSRLS unless it owns the table and the table does not FORCE them.
    `live_oid`: the live table loaded into; None when the restore creates the table (as owner)."""
    if conn.execute("SELECT rolsuper OR rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = current_user"
                    ).fetchone()[0]:
        return None
    if live_oid is None:
        if (spec.get("row_security") or {}).get("forced"):
            return "the table forces row-level security on its owner"
        return None
    enabled, forced, owner = conn.execute(
        "SELECT relrowsecurity, relforcerowsecurity, pg_catalog.pg_has_role(relowner, 'USAGE') "
        "FROM pg_catalog.pg_class WHERE oid = %s", (live_oid,)).fetchone()
    if enabled and forced:
        return "the live table forces row-level security on its owner"
    if enabled and not owner:
        return "the live table has row-level security and this role does not own it"
    return None


def may_create_schemas(conn) -> bool:
    """Whether this role may create schemas here (CREATE on the database): a staging schema
    (swap, and the parallel load of a big new table) needs it."""
    return bool(conn.execute("SELECT pg_catalog.has_database_privilege(pg_catalog.current_database(), "
                             "'CREATE')").fetchone()[0])


def live_triggers(conn, oid: int) -> tuple[list[tuple[str, str]], bool]:
    """([(name, tgenabled)] of the live table's own enabled triggers, whether this role may
    switch them off (it owns the table, directly or through a role it is a member of))."""
    rows = conn.execute("SELECT tgname, tgenabled FROM pg_catalog.pg_trigger WHERE tgrelid = %s "
                        "AND NOT tgisinternal AND tgenabled <> 'D' ORDER BY tgname", (oid,)).fetchall()
    owner = conn.execute("SELECT pg_catalog.pg_has_role(relowner, 'USAGE') FROM pg_catalog.pg_class "
                         "WHERE oid = %s", (oid,)).fetchone()[0]
    return [(str(n), str(e)) for n, e in rows], bool(owner)


# --------------------------------------------------------------------------- sequences

def setval(conn, seq: sql.Composable | str, last_value: int, is_called: bool) -> None:
    name = seq if isinstance(seq, str) else seq.as_string(conn)
    conn.execute("SELECT pg_catalog.setval(%s::regclass, %s, %s)", (name, last_value, is_called))


def advance(conn, seq: sql.Identifier, snap: dict[str, Any]) -> None:
    """Move a shared sequence forward to the snapshot's position, never back."""
    last, called = conn.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(seq)).fetchone()
    step = snap["increment"]
    live_next = last + step if called else last
    snap_next = snap["last_value"] + step if snap["is_called"] else snap["last_value"]
    if (step > 0 and snap_next > live_next) or (step < 0 and snap_next < live_next):
        setval(conn, seq, snap["last_value"], snap["is_called"])


def find_type(conn, schema: str, name: str) -> int | None:
    row = conn.execute("""SELECT t.oid FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n
                          ON n.oid = t.typnamespace WHERE n.nspname = %s AND t.typname = %s""",
                       (schema, name)).fetchone()
    return row[0] if row else None


def serial_sequence(conn, table_sql: str, column: str) -> str | None:
    """The sequence a live table's column draws from (serial or identity), or None."""
    return conn.execute("SELECT pg_catalog.pg_get_serial_sequence(%s, %s)", (table_sql, column)).fetchone()[0]


class Created:
    """What a restore created and committed, so it can be dropped again when a later item fails
    (`undo`): tables, and the schemas, extensions, enum types and shared sequences they
    brought that did not exist before. An item's objects count from its commit on; a rolled
    back item created nothing. Dropped newest first, each without CASCADE under a savepoint:
    an object that something outside the restore came to use meanwhile is kept, and the undo
    fails naming it."""

    def __init__(self):
        self._committed: list[tuple[Any, str, sql.Composable, str]] = []  # (plan, kind, identifier, name)
        self._item: list[tuple[str, sql.Composable, str]] = []

    def add(self, kind: str, ident: sql.Composable, name: str) -> None:
        self._item.append((kind, ident, name))

    def ensure_schema(self, conn, schema: str) -> None:
        # checked first: CREATE SCHEMA IF NOT EXISTS still demands CREATE on the database
        if not conn.execute("SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = %s", (schema,)).fetchone():
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            self.add("SCHEMA", sql.Identifier(schema), schema)

    def ensure_dependencies(self, conn, spec: dict[str, Any], details: dict[str, Any], place: Any) -> None:
        """What a new table needs before CREATE TABLE, each created only if missing (another
        item, or the database, may have it): its schema, extensions, enum types and the shared
        sequences its defaults call."""
        self.ensure_schema(conn, place.schema)
        for ext in details["extensions"]:
            if not conn.execute("SELECT 1 FROM pg_catalog.pg_extension WHERE extname = %s", (ext,)).fetchone():
                conn.execute(sql.SQL("CREATE EXTENSION {}").format(sql.Identifier(ext)))
                self.add("EXTENSION", sql.Identifier(ext), ext)
        for enum in details["enums"]:
            if find_type(conn, enum["schema"], enum["name"]) is None:
                self.ensure_schema(conn, enum["schema"])
                conn.execute(ddl.create_enum(enum))
                self.add("TYPE", sql.Identifier(enum["schema"], enum["name"]), f"{enum['schema']}.{enum['name']}")
        for seq in ddl.used_sequences(spec):
            self.ensure_schema(conn, seq["schema"])
            ident = ddl.sequence_ident(seq, place)
            if conn.execute("SELECT pg_catalog.to_regclass(%s)", (ident.as_string(conn),)).fetchone()[0] is None:
                conn.execute(ddl.create_sequence(seq, place))
                self.add("SEQUENCE", ident, f"{seq['schema']}.{seq['name']}")

    def commit(self, plan: Any) -> None:
        self._committed += [(plan, *obj) for obj in self._item]
        self._item = []

    def forget_item(self) -> None:
        self._item = []

    def drop(self, conn, plans: list) -> str | None:
        """Drop what items of `plans` created; what was done, for the error message."""
        import psycopg

        mine = [obj for obj in self._committed if any(obj[0] is p for p in plans)]
        self._committed, self._item = [], []
        dropped: dict[str, list[str]] = {}
        kept: list[str] = []
        with conn.transaction():
            for _, kind, ident, name in reversed(mine):
                try:
                    with conn.transaction():
                        conn.execute(sql.SQL("DROP {} {}").format(sql.SQL(kind), ident))
                    dropped.setdefault(kind.lower(), []).append(name)
                except psycopg.errors.DependentObjectsStillExist:
                    kept.append(f"{kind.lower()} {name}")
        if not mine:
            return None
        said = [f"the table(s) it had created were dropped: {', '.join(reversed(dropped.pop('table', [])))}"]
        said += [f"so were the {kind}(s) it had created: {', '.join(reversed(names))}" for kind, names in dropped.items()]
        if kept:  # an undo that could not finish: the caller reports it as such
            raise StatevaultError(f"{'; '.join(said)}; but {', '.join(kept)} stayed: something else uses it now")
        return "; ".join(said)
