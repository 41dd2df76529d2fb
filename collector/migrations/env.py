"""Alembic's environment: run the revisions on the connection the caller passes in
(`collector.migrations.upgrade`), inside its transaction; never opens one of its own."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("the collector's migrations run through `pric-collector db upgrade`, not the alembic command")
# render_as_batch: ALTERs on SQLite become copy-and-rename batches (SQLite alters little in place).
context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
