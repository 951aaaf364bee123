"""Planning a PostgreSQL restore: what to do with each table, refused before any write.

See restore.targets.postgres for the actions per target state and mode; `plan_item` decides
one item's, reading the target (never writing it).
"""
from __future__ import annotations

from psycopg import sql

from backup.sources.postgres_schema import FORMAT, SCHEMA_VERSION, describe_columns, find_table, resolve_table_name
from restore.targets import postgres_ddl as ddl
from restore.targets import postgres_live as live
from restore.targets.base import ItemPlan, Mode
from snapshots.errors import IncompatibleTargetError, NotFoundError
from snapshots.manifest import Item, Manifest


def plan_item(conn, item: Item, targets: dict[str, tuple[str, str]], mode: Mode, renamed: bool) -> ItemPlan | None:
    """The plan of one item (`targets`: item name -> (schema, table) of every item restored),
    or None when mode new finds the target table holding rows."""
    spec = item.schema
    schema, name = targets[item.name]
    target = f"{schema}.{name}"
    found = find_table(conn, schema, name)
    notes: list[str] = []
    live_records = None
    # before anything reads the live table: with row_security off, even counting its rows fails
    _refuse_row_security(target, live.row_security_problem(conn, spec, found[0] if found else None))
    if found is None:
        action, method = "create", "create"
    else:
        oid, relkind = found
        if relkind != "r":
            raise IncompatibleTargetError(f"{target} exists on the target and is not a plain table "
                                          f"(relkind {relkind!r})")
        inherits = conn.execute("SELECT relispartition OR relhassubclass OR EXISTS (SELECT 1 FROM "
                                     "pg_catalog.pg_inherits WHERE inhrelid = %s) FROM pg_catalog.pg_class "
                                     "WHERE oid = %s", (oid, oid)).fetchone()[0]
        diffs = ddl.compatible(spec, describe_columns(conn, oid))
        live_records = conn.execute(sql.SQL("SELECT count(*) FROM ONLY {}").format(
            sql.Identifier(schema, name))).fetchone()[0]
        if mode == "new":
            if live_records:
                return None
            if diffs:
                raise IncompatibleTargetError(f"{target} exists with other columns than snapshot item "
                                              f"{item.name}: {'; '.join(diffs)}; nothing was written")
            action, method = "create", "load"
        elif mode == "replace" and not diffs:
            action, method = "replace", "truncate"
        else:
            action, method = ("swap", "stage") if mode == "swap" else ("replace", "recreate")
            if inherits:
                raise IncompatibleTargetError(f"{target} is part of a partition or inheritance tree, which "
                                              f"{'a swap' if mode == 'swap' else 'recreating it'} would break",
                                              hint="Use --mode replace with the snapshot's columns, or --into.")
            views = live.dependent_views(conn, oid)
            if views:
                raise IncompatibleTargetError(f"{target} has dependent views ({', '.join(views)}) that "
                                              f"{'a swap' if mode == 'swap' else 'recreating it'} would drop",
                                              hint="Restore --into a new name, or drop and recreate the views.")
            if diffs:
                notes.append(f"recreated with the snapshot's columns ({'; '.join(diffs)})")
            notes.append("privileges, owner and publication memberships are carried over from the live "
                         "table; triggers, policies, comments, storage options and replica identity come "
                         "from the snapshot")
    if method in ("recreate", "stage"):  # a new table, this role its owner
        _refuse_row_security(target, live.row_security_problem(conn, spec, None))
    if method == "stage" and not live.may_create_schemas(conn):
        raise IncompatibleTargetError(f"{target}: a swap builds the table in a staging schema, and this role may "
                                      "not create schemas in this database; nothing was written",
                                      hint="GRANT CREATE ON DATABASE to the restoring role, or use --mode replace.")
    enums, extensions, problems = live.check_types(conn, spec)
    if problems:
        raise IncompatibleTargetError(f"{target}: {'; '.join(problems)}; nothing was written")
    restored = {(s, t) for s, t in targets.values()}
    foreign_keys = []
    if method in ("create", "recreate", "stage"):
        for fk in spec["foreign_keys"]:
            ref = fk["references"]
            is_self = (ref["schema"], ref["name"]) == (spec["table"]["schema"], spec["table"]["name"])
            if is_self or (not renamed and ((ref["schema"], ref["name"]) in restored
                                            or find_table(conn, ref["schema"], ref["name"]))):
                foreign_keys.append(fk)
            else:
                why = "restore --into" if renamed else f"{ref['schema']}.{ref['name']} does not exist"
                notes.append(f"foreign key {fk['name']} not recreated ({why})")
    skip_triggers, skip_policies = [], []
    if method in ("create", "recreate", "stage"):
        skip_triggers, skip_policies, missing = live.missing_dependencies(conn, spec)
        notes += missing
    elif found is not None:
        triggers, owner = live.live_triggers(conn, found[0])
        names = ", ".join(n for n, _ in triggers)
        if triggers and owner:
            notes.append(f"live triggers {names} are switched off for the load and back on after it")
        elif triggers:
            notes.append(f"live triggers {names} fire for the restored rows: this role does not own "
                         f"{target}, so it cannot switch them off (verification will show what they changed)")
    details = {"schema": schema, "table": name, "method": method, "enums": enums, "extensions": extensions,
               "foreign_keys": foreign_keys, "live_oid": found[0] if found else None,
               "skip_triggers": skip_triggers, "skip_policies": skip_policies}
    selector = [target] if action in ("replace", "swap") else []
    return ItemPlan(item=item, target=target, action=action, live_records=live_records,
                    backup_selector=selector, notes=notes, details=details)



def _refuse_row_security(target: str, problem: str | None) -> None:
    if problem:
        raise IncompatibleTargetError(f"{target}: {problem}, so this role could neither load it nor read it back "
                                      "for verification; nothing was written",
                                      hint="Restore as a superuser or a role with BYPASSRLS, as the backup "
                                           "(which reads past row-level security too) must have run.")


def select_items(manifest: Manifest, only: list[str]) -> list[Item]:
    if not only:
        return list(manifest.items)
    by_name = {i.name: i for i in manifest.items}
    chosen = []
    for name in only:
        full = name if name in by_name else ".".join(resolve_table_name(name))
        if full not in by_name:
            names = ", ".join(by_name) or "none"
            raise NotFoundError(f"snapshot {manifest.id} has no table {name!r} (items: {names})")
        if by_name[full] not in chosen:
            chosen.append(by_name[full])
    return chosen


def check_item(item: Item) -> None:
    if item.format != FORMAT or item.schema.get("schema_version") != SCHEMA_VERSION:
        raise IncompatibleTargetError(f"item {item.name} has format {item.format!r} (schema version "
                                      f"{item.schema.get('schema_version')}); this statevault restores "
                                      f"{FORMAT} version {SCHEMA_VERSION} into PostgreSQL")
