"""The collector's schema migrations (Alembic), configured in code: no alembic.ini, the
scripts live in this package and install with it.

Every change of the stored schema is a revision under `versions/`; a new database is
created by upgrading an empty one to the head revision. A database made by 0.7.0 or
earlier (tables created without Alembic, so no `alembic_version` table) is recognised
and recorded as the first revision, which holds exactly that schema, before it is
upgraded. Migrations run inside the caller's write transaction (`Database.write`), so
they are serialised with every other writer, and a revision that fails rolls back with
everything before it in the same run: SQLite and PostgreSQL both have transactional DDL.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, inspect, text

if TYPE_CHECKING:
    from alembic.config import Config

SCRIPT_LOCATION = str(Path(__file__).resolve().parent)
BASELINE = "0001"  # the schema 0.7.0 created with metadata.create_all
# The newest revision, also written here so that a start on a current database needs no
# Alembic import (most of a second on a busy machine); test_migrations checks it is the
# scripts' head.
HEAD = "0002"
VERSION_TABLE = "alembic_version"

# Alembic logs every plugin it loads and every revision at INFO, which the collector's CLIs
# show: a first `serve` would open with a dozen such lines. The CLIs report what was
# upgraded themselves; Alembic's warnings and errors still show.
logging.getLogger("alembic").setLevel(logging.WARNING)


def _config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    """The newest revision these scripts know (read from the scripts)."""
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(_config()).get_heads()
    assert len(heads) == 1, f"the collector's migrations have several heads: {heads}"
    return heads[0]


@dataclass(frozen=True)
class SchemaState:
    """Where a database stands: `revision` None and `empty` True for a new database;
    `unversioned` for a 0.7.0 database (its tables, no version table)."""

    revision: str | None
    empty: bool
    unversioned: bool
    head: str

    @property
    def at_head(self) -> bool:
        return self.revision == self.head and not self.unversioned

    @property
    def known(self) -> bool:
        """False when the revision is not one of ours (made by a newer release)."""
        if self.revision is None or self.revision == self.head:
            return True
        from alembic.script import ScriptDirectory

        return self.revision in {s.revision for s in ScriptDirectory.from_config(_config()).walk_revisions()}

    def describe(self) -> str:
        if self.empty:
            return "empty (no tables)"
        if self.unversioned:
            return f"unversioned (0.7.0 or earlier; recorded as {BASELINE} on upgrade)"
        return self.revision or "no revision"


def schema_state(conn: Connection) -> SchemaState:
    tables = set(inspect(conn).get_table_names())
    revision = None
    if VERSION_TABLE in tables:
        rows = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).fetchall()
        if len(rows) > 1:
            raise ValueError(f"{VERSION_TABLE} holds {len(rows)} revisions; the collector's migrations have one head")
        revision = rows[0][0] if rows else None
    ours = tables - {VERSION_TABLE}
    # HEAD without importing Alembic when the database is at it (the usual start)
    return SchemaState(revision=revision, empty=not ours and revision is None,
                       unversioned=bool(ours) and revision is None, head=HEAD if revision == HEAD else head())


def upgrade(conn: Connection, target: str = "head") -> tuple[str | None, str]:
    """Upgrade the database behind `conn` (inside its open transaction) to `target`;
    returns (revision before, revision after). A 0.7.0 database is first stamped BASELINE."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    state = schema_state(conn)
    if not state.known:
        raise UnknownRevisionError(state.revision)
    cfg = _config(conn)
    if state.unversioned:
        command.stamp(cfg, BASELINE)
    before = BASELINE if state.unversioned else state.revision
    command.upgrade(cfg, target)
    return before, MigrationContext.configure(conn).get_current_revision() or ""


class UnknownRevisionError(Exception):
    def __init__(self, revision: str | None) -> None:
        super().__init__(f"revision {revision!r} is not one this release knows (made by a newer release?)")
        self.revision = revision
