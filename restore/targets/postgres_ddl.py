"""SQL that recreates a backed-up table from its snapshot schema (backup.sources.postgres).

Pure builders: each returns psycopg `sql.Composed` statements, nothing executes here. The
snapshot's expressions (types, defaults, constraint and index definitions) are catalog
output printed with an empty search_path, so they are schema-qualified and can be replayed
verbatim; only the names that belong to the table itself are rewritten when it is restored
under another name (`Placement`).

Order of a load (restore.targets.postgres): extensions, enum types, sequences, CREATE TABLE
(columns, defaults, identity, generated columns, NOT NULL), COPY, then primary key, unique,
exclusion and check constraints and indexes (building them once after the load is much
faster than maintaining them row by row), OWNED BY, setval, comments, row-level security and
policies, triggers (created after the load, so they do not fire for the restored rows, as
with pg_restore); foreign keys last.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from psycopg import sql

MAX_IDENTIFIER = 63  # bytes: NAMEDATALEN - 1


def _truncate(name: str) -> str:
    data = name.encode()
    if len(data) <= MAX_IDENTIFIER:
        return name
    return data[:MAX_IDENTIFIER].decode("utf-8", "ignore")


@dataclass(frozen=True)
class Placement:
    """Where one item's table is written: `schema.name`, from the snapshot's `orig_name`.

    When the table is renamed (restore --into), its indexes, constraints and owned sequences
    are renamed with it (a `memories_` prefix becomes `<new name>_`; other names get the new
    table name as prefix), so they do not collide with the live table's in the same schema.
    Sequences the table owns are created in the table's schema; shared ones keep their name.
    """

    schema: str
    name: str
    orig_name: str

    @property
    def table(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    def object_name(self, name: str) -> str:
        if self.name == self.orig_name:
            return name
        if name.startswith(self.orig_name):
            return _truncate(self.name + name[len(self.orig_name):])
        return _truncate(f"{self.name}_{name}")

    def moved(self, schema: str) -> "Placement":
        return Placement(schema, self.name, self.orig_name)


def owned_sequences(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in spec["sequences"] if s["owned_by"]]


def used_sequences(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Sequences the table's defaults call but does not own (shared; never renamed or rewound)."""
    return [s for s in spec["sequences"] if not s["owned_by"]]


def sequence_ident(seq: dict[str, Any], place: Placement) -> sql.Identifier:
    if seq["owned_by"]:
        return sql.Identifier(place.schema, place.object_name(seq["name"]))
    return sql.Identifier(seq["schema"], seq["name"])


def _sequence_options(seq: dict[str, Any]) -> sql.Composed:
    cycle = "CYCLE" if seq["cycle"] else "NO CYCLE"
    return sql.SQL("INCREMENT BY {} MINVALUE {} MAXVALUE {} START WITH {} CACHE {} " + cycle).format(
        *(sql.Literal(int(seq[k])) for k in ("increment", "min", "max", "start", "cache")))


def create_sequence(seq: dict[str, Any], place: Placement) -> sql.Composed:
    return sql.SQL("CREATE SEQUENCE {} AS {} {}").format(sequence_ident(seq, place), sql.SQL(seq["type"]),
                                                        _sequence_options(seq))


def create_enum(enum: dict[str, Any]) -> sql.Composed:
    return sql.SQL("CREATE TYPE {} AS ENUM ({})").format(
        sql.Identifier(enum["schema"], enum["name"]), sql.SQL(", ").join(sql.Literal(x) for x in enum["labels"]))


def _column(col: dict[str, Any], spec: dict[str, Any], place: Placement, conn) -> sql.Composed:
    parts: list[sql.Composable] = [sql.Identifier(col["name"]), sql.SQL(col["type"])]
    if col.get("collation"):
        parts.append(sql.SQL("COLLATE " + col["collation"]))
    if col["generated"]:
        parts.append(sql.SQL("GENERATED ALWAYS AS ({}) STORED").format(sql.SQL(col["generated"])))
    elif col["identity"]:
        seq = next((s for s in spec["sequences"] if s["identity"] and s["owned_by"] == col["name"]), None)
        options = sql.SQL("")
        if seq is not None:
            options = sql.SQL(" (SEQUENCE NAME {} {})").format(sequence_ident(seq, place), _sequence_options(seq))
        parts.append(sql.SQL("GENERATED " + col["identity"].upper() + " AS IDENTITY{}").format(options))
    elif col.get("serial"):
        seq = next(s for s in spec["sequences"] if s["name"] == col["serial"] and s["owned_by"] == col["name"])
        name = sequence_ident(seq, place).as_string(conn)
        parts.append(sql.SQL("DEFAULT nextval({}::regclass)").format(sql.Literal(name)))
    elif col["default"] is not None:
        parts.append(sql.SQL("DEFAULT " + col["default"]))
    if col["not_null"]:
        parts.append(sql.SQL("NOT NULL"))
    return sql.SQL(" ").join(parts)


def create_table(spec: dict[str, Any], place: Placement, conn) -> sql.Composed:
    """CREATE TABLE with columns only; constraints and indexes come after the load."""
    cols = sql.SQL(", ").join(_column(c, spec, place, conn) for c in spec["columns"])
    kind = "CREATE UNLOGGED TABLE" if spec.get("unlogged") else "CREATE TABLE"
    stmt = sql.SQL(kind + " {} ({})").format(place.table, cols)
    options = [_storage_option(o) for o in spec.get("storage_options", [])]
    if options:  # before the load: fillfactor shapes the pages COPY writes
        stmt += sql.SQL(" WITH ({})").format(sql.SQL(", ").join(options))
    return stmt


def _storage_option(option: str) -> sql.Composed:
    """`name=value` from pg_class.reloptions as a WITH (...) entry; the value quoted."""
    name, _, value = option.partition("=")
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ValueError(f"unexpected storage option in the snapshot: {option!r}")
    return sql.SQL(name + " = {}").format(sql.Literal(value))


def after_load(spec: dict[str, Any], place: Placement) -> list[sql.Composed]:
    """Primary key, unique/exclusion/check constraints, indexes, and OWNED BY for serials."""
    out = []
    for con in spec["constraints"]:
        out.append(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
            place.table, sql.Identifier(place.object_name(con["name"])), sql.SQL(con["definition"])))
    for index in spec["indexes"]:
        unique = "UNIQUE " if index["unique"] else ""
        out.append(sql.SQL("CREATE " + unique + "INDEX {} ON {} {}").format(
            sql.Identifier(place.object_name(index["name"])), place.table, sql.SQL(index["using"])))
    for seq in owned_sequences(spec):
        if not seq["identity"]:
            out.append(sql.SQL("ALTER SEQUENCE {} OWNED BY {}").format(
                sequence_ident(seq, place), sql.Identifier(place.schema, place.name, seq["owned_by"])))
    return out


def table_objects(spec: dict[str, Any], place: Placement, *, skip_triggers: frozenset[str] = frozenset(),
                  skip_policies: frozenset[str] = frozenset()) -> list[sql.Composed]:
    """Comments, row-level security, policies, replica identity and triggers
    (backup.sources.postgres_objects)
    of the table now at `place`, except the named triggers and policies (their function or
    roles are missing on the target). Absent from snapshots older than those keys."""
    table, out = place.table, []
    comments = spec.get("comments") or {}
    if comments.get("table") is not None:
        out.append(sql.SQL("COMMENT ON TABLE {} IS {}").format(table, sql.Literal(comments["table"])))
    for column, text in (comments.get("columns") or {}).items():
        out.append(sql.SQL("COMMENT ON COLUMN {} IS {}").format(
            sql.Identifier(place.schema, place.name, column), sql.Literal(text)))
    for index, text in (comments.get("indexes") or {}).items():  # renamed with the table (after_load)
        out.append(sql.SQL("COMMENT ON INDEX {} IS {}").format(
            sql.Identifier(place.schema, place.object_name(index)), sql.Literal(text)))
    foreign_keys = {fk["name"] for fk in spec.get("foreign_keys", [])}  # commented once added (finish)
    for constraint, text in (comments.get("constraints") or {}).items():
        if constraint not in foreign_keys:
            out.append(constraint_comment(place, constraint, text))
    security = spec.get("row_security") or {}
    if security.get("enabled"):
        out.append(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(table))
    if security.get("forced"):
        out.append(sql.SQL("ALTER TABLE {} FORCE ROW LEVEL SECURITY").format(table))
    for policy in spec.get("policies", []):
        if policy["name"] in skip_policies:
            continue
        roles = sql.SQL(", ").join(sql.SQL("PUBLIC") if r == "public" else sql.Identifier(r) for r in policy["roles"])
        stmt = sql.SQL("CREATE POLICY {} ON {} AS " + ("PERMISSIVE" if policy["permissive"] else "RESTRICTIVE")
                       + " FOR " + policy["command"] + " TO {}").format(sql.Identifier(policy["name"]), table, roles)
        if policy["using"] is not None:
            stmt += sql.SQL(" USING ({})").format(sql.SQL(policy["using"]))
        if policy["check"] is not None:
            stmt += sql.SQL(" WITH CHECK ({})").format(sql.SQL(policy["check"]))
        out.append(stmt)
    identity = spec.get("replica_identity") or {"kind": "default"}
    if identity["kind"] == "index":
        out.append(sql.SQL("ALTER TABLE {} REPLICA IDENTITY USING INDEX {}").format(
            table, sql.Identifier(place.object_name(identity["index"]))))
    elif identity["kind"] != "default":
        kind = {"nothing": "NOTHING", "full": "FULL"}[identity["kind"]]
        out.append(sql.SQL("ALTER TABLE {} REPLICA IDENTITY " + kind).format(table))
    for trigger in spec.get("triggers", []):
        if trigger["name"] in skip_triggers:
            continue
        name = sql.Identifier(trigger["name"])
        # catalog text goes in as arguments, never into a template (it may hold braces)
        out.append(sql.SQL("CREATE " + ("CONSTRAINT " if trigger["constraint"] else "") + "TRIGGER {} {} ON {} {}")
                   .format(name, sql.SQL(trigger["timing"]), table, sql.SQL(trigger["body"])))
        if trigger["enabled"] != "O":
            out.append(trigger_state(table, trigger["name"], trigger["enabled"]))
    return out


def constraint_comment(place: Placement, constraint: str, text: str) -> sql.Composed:
    """COMMENT ON CONSTRAINT for the snapshot's `constraint` of the table now at `place`."""
    return comment_on_constraint(place.table, place.object_name(constraint), text)


def comment_on_constraint(table: sql.Composable, name: str, text: str) -> sql.Composed:
    return sql.SQL("COMMENT ON CONSTRAINT {} ON {} IS {}").format(sql.Identifier(name), table, sql.Literal(text))


def trigger_state(table: sql.Composable, name: str, enabled: str) -> sql.Composed:
    """ALTER TABLE ... {ENABLE|DISABLE|ENABLE REPLICA|ENABLE ALWAYS} TRIGGER: pg_trigger.tgenabled
    O, D, R or A."""
    state = {"O": "ENABLE", "D": "DISABLE", "R": "ENABLE REPLICA", "A": "ENABLE ALWAYS"}[enabled]
    return sql.SQL("ALTER TABLE {} " + state + " TRIGGER {}").format(table, sql.Identifier(name))


def copy_in(spec: dict[str, Any], table: sql.Identifier) -> sql.Composed:
    if not spec["copy_columns"]:
        return sql.SQL("COPY {} FROM STDIN").format(table)
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in spec["copy_columns"])
    return sql.SQL("COPY {} ({}) FROM STDIN").format(table, cols)


def strip_not_valid(definition: str) -> str:
    return definition[: -len(" NOT VALID")] if definition.endswith(" NOT VALID") else definition


def foreign_key(fk: dict[str, Any], spec: dict[str, Any], place: Placement, conn, *,
                not_valid: bool = True) -> sql.Composed:
    """ADD CONSTRAINT for a snapshot foreign key of the table now at `place` (its final name);
    a self-reference follows the table to its new name."""
    definition = fk["definition"]
    orig = spec["table"]
    if fk["references"] == {"schema": orig["schema"], "name": orig["name"]}:
        new_ref = place.table.as_string(conn)
        definition = definition.replace(f" REFERENCES {fk['references_sql']}(", f" REFERENCES {new_ref}(", 1)
    return add_constraint(place.table, place.object_name(fk["name"]), definition, not_valid)


def add_constraint(table: sql.Composable, name: str, definition: str, not_valid: bool) -> sql.Composed:
    tail = " NOT VALID" if not_valid else ""
    return sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}" + tail).format(
        table, sql.Identifier(name), sql.SQL(strip_not_valid(definition)))


def compatible(spec: dict[str, Any], live_columns: list[dict[str, Any]]) -> list[str]:
    """Differences between the snapshot's record columns and a live table's ([] = compatible).

    Column order does not matter (COPY names its columns); names and types must be equal.
    """
    want = {c["name"]: c["type"] for c in spec["columns"] if not c["generated"]}
    have = {c["name"]: c["type"] for c in live_columns if not c["generated"]}
    diffs = [f"missing column {n} {t}" for n, t in want.items() if n not in have]
    diffs += [f"extra column {n} {t}" for n, t in have.items() if n not in want]
    diffs += [f"column {n} is {have[n]}, snapshot has {t}" for n, t in want.items() if n in have and have[n] != t]
    return diffs
