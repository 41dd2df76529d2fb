"""Schema migrations (collector.migrations, Alembic): new databases are created at the
head revision, a data folder made by release 0.7.0 (before migrations; its SQL dump is
tests/collector/assets/release-0.7.0.sql, made by make_release_0_7_0.py with that release's
code) upgrades in place with every row kept, `serve` refuses a database behind head, and a
revision that fails leaves the data as it was."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, make_url, text
from sqlalchemy.pool import NullPool

from collector import migrations
from collector.app import create_app
from collector.cli import main
from collector.db import DB_FILE, Database, SchemaNotCurrentError, metadata
from protocol import routes

ASSETS = Path(__file__).parent / "assets"
RELEASE_SQL = ASSETS / "release-0.7.0.sql"
RELEASE_TOKENS = json.loads((ASSETS / "release-0.7.0.tokens.json").read_text())
PG_URL = os.environ.get("PRIC_TEST_POSTGRES_URL") or None
needs_pg = pytest.mark.skipif(PG_URL is None, reason="PRIC_TEST_POSTGRES_URL is not set (a PostgreSQL URL such as "
                                                     "postgresql+psycopg://postgres@127.0.0.1:5432/pric; docs/postgres.md)")
RELEASE_TABLES = ("participants", "tokens", "models", "items", "classifiers", "classifier_participants", "invites",
                  "usage", "meta")


def release_folder(data_dir: Path) -> Path:
    """A data folder as 0.7.0 left it: its database and the high-water file beside it."""
    data_dir.mkdir(parents=True)
    conn = sqlite3.connect(data_dir / DB_FILE)
    conn.executescript(RELEASE_SQL.read_text(encoding="utf-8"))
    commits = int(conn.execute("SELECT value FROM meta WHERE key = 'commit_seq'").fetchone()[0])
    conn.close()
    (data_dir / f"{DB_FILE}.high-water").write_text(json.dumps({"commits": commits, "database": DB_FILE}) + "\n")
    return data_dir


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / DB_FILE}"


def on_sqlite(data_dir: Path) -> list[str]:
    """The options naming the data folder's SQLite file explicitly (so that these tests use
    the release's SQLite file also when PRIC_TEST_DATABASE_URL points the others elsewhere)."""
    return ["--data-dir", str(data_dir), "--database-url", sqlite_url(data_dir)]


def rows(url_or_path, tables=RELEASE_TABLES) -> dict[str, list[tuple]]:
    """Every row of every table, in a stable order (meta's commit counter left out: it counts writes)."""
    url = url_or_path if isinstance(url_or_path, str) else f"sqlite:///{url_or_path / DB_FILE}"
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            out = {}
            for t in tables:
                got = [tuple(r) for r in conn.execute(text(f"SELECT * FROM {t}"))]
                out[t] = sorted((r for r in got if r[0] != "commit_seq"), key=repr)
            return out
    finally:
        engine.dispose()


def test_a_new_database_is_created_at_head_and_matches_the_code(tmp_path, tiny_model_dir):
    app = create_app({"DATA_DIR": str(tmp_path / "d"), "MODELS_DIR": str(tiny_model_dir)})
    db = app.extensions["pric"].db  # SQLite, or PostgreSQL under PRIC_TEST_DATABASE_URL
    with db.read() as conn:
        state = migrations.schema_state(conn)
        assert state.at_head and state.revision == migrations.head()
        # the tables the revisions make are the ones collector.db declares: no drift
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    db.dispose()


def test_the_head_constant_is_the_scripts_head():
    assert migrations.HEAD == migrations.head()


def test_the_first_revision_is_the_release_schema(tmp_path):
    """Upgrading to 0001 makes what 0.7.0's create_all made, table for table, column for column."""
    old = release_folder(tmp_path / "old")
    db = Database(f"sqlite:///{tmp_path / 'new.sqlite3'}")
    with db.write() as conn:
        migrations.upgrade(conn, migrations.BASELINE)
    db.dispose()

    def schema(path: Path) -> dict:
        insp = inspect(create_engine(f"sqlite:///{path}", poolclass=NullPool))
        return {t: ([(c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(t)],
                    insp.get_pk_constraint(t)["constrained_columns"], insp.get_foreign_keys(t),
                    insp.get_indexes(t), insp.get_unique_constraints(t))
                for t in RELEASE_TABLES}

    assert schema(tmp_path / "new.sqlite3") == schema(old / DB_FILE)


@pytest.mark.slow
def test_a_release_folder_is_refused_then_upgrades_in_place_and_serves(tmp_path, tiny_model_dir, capsys):
    data = release_folder(tmp_path / "data")
    before = rows(data)
    assert len(before["items"]) == 12 and len(before["participants"]) == 3 and len(before["tokens"]) == 5

    # serve (and every command that needs the schema) refuses, in one line naming the fix
    assert main(["serve", *on_sqlite(data), "--models-dir", str(tiny_model_dir), "--port", "0"]) == 13
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pric-collector db upgrade" in err and "unversioned" in err
    assert main(["stats", *on_sqlite(data)]) == 13
    with pytest.raises(SchemaNotCurrentError):
        create_app({"DATA_DIR": str(data), "DATABASE_URL": sqlite_url(data), "MODELS_DIR": str(tiny_model_dir)})
    assert rows(data) == before
    capsys.readouterr()

    assert main(["db", "upgrade", *on_sqlite(data)]) == 0
    out = capsys.readouterr().out
    assert f"upgraded schema from {migrations.BASELINE} to {migrations.head()}" in out
    backups = list(data.glob(f"{DB_FILE}.before-*"))
    assert len(backups) == 1  # one copy, taken before migrating: the release schema, every row
    copy = sqlite3.connect(backups[0])
    assert copy.execute("SELECT count(*) FROM items").fetchone() == (12,)
    assert copy.execute("SELECT count(*) FROM sqlite_master WHERE name = 'alembic_version'").fetchone() == (0,)
    copy.close()
    assert rows(data) == before  # every row survives
    assert main(["db", "upgrade", *on_sqlite(data)]) == 0
    assert "already at" in capsys.readouterr().out
    assert main(["db", "current", *on_sqlite(data)]) == 0
    assert f"schema revision {migrations.head()}" in capsys.readouterr().out

    # the upgraded collector serves the old data to the old tokens
    app = create_app({"DATA_DIR": str(data), "DATABASE_URL": sqlite_url(data), "MODELS_DIR": str(tiny_model_dir),
                      "ALLOW_UNATTESTED": True})
    client = app.test_client()
    bearer = {k: {routes.AUTH_HEADER: routes.BEARER + v} for k, v in RELEASE_TOKENS.items()}
    assert client.get(routes.ME, headers=bearer["participant0"]).json["items"] == 6
    assert client.get(routes.ME, headers=bearer["participant2"]).json["items"] == 0  # withdrawn, token kept
    stats = client.get(routes.STATS, headers=bearer["operator"]).json
    assert stats["items"] == 12 and stats["participants"] == 3 and stats["classifiers"][0]["stale"] is True
    exported = client.get(routes.EXPORT, headers=bearer["auditor"], query_string={"limit": 100}).json
    assert len(exported["items"]) == 12
    app.extensions["pric"].db.dispose()


def _with_failing_revision(tmp_path: Path, monkeypatch) -> None:
    """The migrations plus a revision after head that changes things, then fails."""
    scripts = tmp_path / "migrations"
    shutil.copytree(migrations.SCRIPT_LOCATION, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "9999_fails.py").write_text(f'''
import sqlalchemy as sa
from alembic import op

revision = "9999"
down_revision = {migrations.head()!r}


def upgrade():
    op.create_table("half_done", sa.Column("id", sa.Integer, primary_key=True))
    op.execute("DELETE FROM tokens")
    op.execute("UPDATE items SET labels = '{{}}'")
    raise RuntimeError("deliberately failing revision")
''')
    monkeypatch.setattr(migrations, "SCRIPT_LOCATION", str(scripts))


def test_a_failing_revision_leaves_the_release_data_untouched(tmp_path, monkeypatch, capsys):
    data = release_folder(tmp_path / "data")
    before = rows(data)
    _with_failing_revision(tmp_path, monkeypatch)
    assert main(["db", "upgrade", *on_sqlite(data), "--no-backup"]) == 14
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "rolled back" in err and "deliberately failing revision" in err
    assert rows(data) == before
    tables = set(inspect(create_engine(f"sqlite:///{data / DB_FILE}", poolclass=NullPool)).get_table_names())
    assert tables == set(RELEASE_TABLES)  # not even the version table or 0002's jobs table
    monkeypatch.undo()
    assert main(["db", "upgrade", *on_sqlite(data), "--no-backup"]) == 0  # the real one still applies
    assert rows(data) == before


def test_a_database_from_a_newer_release_is_refused(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "d"
    create_app({"DATA_DIR": str(data), "DATABASE_URL": sqlite_url(data),
                "MODELS_DIR": str(tiny_model_dir)}).extensions["pric"].db.dispose()
    conn = sqlite3.connect(data / DB_FILE)
    conn.execute("UPDATE alembic_version SET version_num = 'f00d'")
    conn.commit()
    conn.close()
    assert main(["stats", *on_sqlite(data)]) == 13
    assert "newer release" in capsys.readouterr().err
    assert main(["db", "upgrade", *on_sqlite(data)]) == 13


# --- PostgreSQL ---------------------------------------------------------------------------------

@pytest.fixture
def pg_schema_url():
    """A URL whose connections see only a fresh schema of PRIC_TEST_POSTGRES_URL's database."""
    admin = create_engine(PG_URL, poolclass=NullPool)
    name = "t_mig_" + secrets.token_hex(6)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {name}"))
    try:
        yield make_url(PG_URL).update_query_dict({"options": f"-csearch_path={name}"}).render_as_string(
            hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {name} CASCADE"))
        admin.dispose()


def release_on_postgres(url: str, tmp_path: Path) -> None:
    """The release's tables and rows on PostgreSQL: revision 0001 (the release schema, as
    test_the_first_revision_is_the_release_schema checks) without its version row, and
    the release dump's rows copied over."""
    db = Database(url)
    with db.write() as conn:
        migrations.upgrade(conn, migrations.BASELINE)
        conn.execute(text("DROP TABLE alembic_version"))
    src = create_engine(f"sqlite:///{release_folder(tmp_path / 'src') / DB_FILE}", poolclass=NullPool)
    with src.connect() as s, db.write() as conn:
        for table in metadata.sorted_tables:
            if table.name in RELEASE_TABLES:
                got = [dict(r._mapping) for r in s.execute(text(f"SELECT * FROM {table.name}"))]
                if table.name == "classifiers":
                    for r in got:
                        r["stale"] = bool(r["stale"])
                if got:
                    conn.execute(table.insert(), got)
        conn.execute(text("SELECT setval('items_id_seq', (SELECT max(id) FROM items))"))
    src.dispose()
    db.dispose()


@pytest.mark.slow
@needs_pg
def test_postgres_release_schema_upgrades_and_a_failing_revision_rolls_back(pg_schema_url, tmp_path, monkeypatch,
                                                                          tiny_model_dir, capsys):
    release_on_postgres(pg_schema_url, tmp_path)
    before = rows(pg_schema_url)
    assert len(before["items"]) == 12
    args = ["--data-dir", str(tmp_path / "d"), "--database-url", pg_schema_url]
    assert main(["stats", *args]) == 13
    _with_failing_revision(tmp_path, monkeypatch)
    assert main(["db", "upgrade", *args]) == 14
    assert "rolled back" in capsys.readouterr().err
    assert rows(pg_schema_url) == before
    assert "half_done" not in inspect(create_engine(pg_schema_url, poolclass=NullPool)).get_table_names()
    monkeypatch.undo()
    assert main(["db", "upgrade", *args]) == 0
    assert rows(pg_schema_url) == before
    app = create_app({"DATA_DIR": str(tmp_path / "d"), "DATABASE_URL": pg_schema_url,
                      "MODELS_DIR": str(tiny_model_dir), "ALLOW_UNATTESTED": True})
    bearer = {routes.AUTH_HEADER: routes.BEARER + RELEASE_TOKENS["operator"]}
    assert app.test_client().get(routes.STATS, headers=bearer).json["items"] == 12
    with app.extensions["pric"].db.read() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    app.extensions["pric"].db.dispose()


def test_a_first_serve_does_not_print_alembics_info_log(tmp_path, tiny_model_dir):
    """`serve` on a new folder creates the schema through Alembic: the operator sees the
    collector's lines, none of the INFO lines Alembic logs for every plugin and revision
    (there used to be a dozen before the "serving on" line)."""
    import subprocess
    import sys

    from collector.launch import SERVING_RE

    proc = subprocess.Popen([sys.executable, "-m", "collector.cli", "serve", "--data-dir", str(tmp_path / "new"),
                             "--models-dir", str(tiny_model_dir.parent), "--allow-unattested", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert SERVING_RE.search(line), line
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "alembic" not in err and "setup plugin" not in err, err[:2000]
