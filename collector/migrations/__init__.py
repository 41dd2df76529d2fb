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

from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect

SCRIPT_LOCATION = str(Path(__file__).resolve().parent)
BASELINE = "0001"  # the schema 0.7.0 created with metadata.create_all
VERSION_TABLE = "alembic_version"


def _config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    """The newest revision these scripts know."""
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
        if self.revision is None:
            return True
        return self.revision in {s.revision for s in ScriptDirectory.from_config(_config()).walk_revisions()}

    def describe(self) -> str:
        if self.empty:
            return "empty (no tables)"
        if self.unversioned:
            return f"unversioned (0.7.0 or earlier; recorded as {BASELINE} on upgrade)"
        return self.revision or "no revision"


def schema_state(conn: Connection) -> SchemaState:
    tables = set(inspect(conn).get_table_names())
    revision = MigrationContext.configure(conn).get_current_revision() if VERSION_TABLE in tables else None
    ours = tables - {VERSION_TABLE}
    return SchemaState(revision=revision, empty=not ours and revision is None,
                       unversioned=bool(ours) and revision is None, head=head())


def upgrade(conn: Connection, target: str = "head") -> tuple[str | None, str]:
    """Upgrade the database behind `conn` (inside its open transaction) to `target`;
    returns (revision before, revision after). A 0.7.0 database is first stamped BASELINE."""
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
