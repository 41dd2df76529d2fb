"""The schema of 0.7.0 (what `metadata.create_all` made before migrations existed).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "participants",
        sa.Column("participant_id", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "tokens",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("participant_id", sa.String(64), sa.ForeignKey("participants.participant_id"), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "models",
        sa.Column("model_id", sa.String(200), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("card_json", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("registered_at", sa.Float, nullable=False),
        sa.Column("retired_at", sa.Float, nullable=True),
    )
    op.create_table(
        "items",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("participant_id", sa.String(64), sa.ForeignKey("participants.participant_id"), nullable=False),
        sa.Column("item_id", sa.String(64), nullable=False),
        sa.Column("model_id", sa.String(200), sa.ForeignKey("models.model_id"), nullable=False),
        sa.Column("arrays", sa.LargeBinary, nullable=False),
        sa.Column("array_names", sa.Text, nullable=False),
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("participant_id", "item_id", name="uq_items_participant_item"),
    )
    op.create_index("ix_items_model", "items", ["model_id", "id"])
    op.create_table(
        "classifiers",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("task", sa.String(64), nullable=False),
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("accuracy", sa.Float, nullable=False),
        sa.Column("majority_rate", sa.Float, nullable=False),
        sa.Column("n_train", sa.Integer, nullable=False),
        sa.Column("n_test", sa.Integer, nullable=False),
        sa.Column("trained_at", sa.Float, nullable=False),
        sa.Column("stale", sa.Boolean, nullable=False),
    )
    op.create_table(
        "classifier_participants",
        sa.Column("classifier_id", sa.Integer, sa.ForeignKey("classifiers.id"), primary_key=True),
        sa.Column("participant_id", sa.String(64), primary_key=True),
    )
    op.create_table(
        "invites",
        sa.Column("code_hash", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("used_at", sa.Float, nullable=True),
        sa.Column("participant_id", sa.String(64), nullable=True),
    )
    op.create_table(
        "usage",
        sa.Column("participant_id", sa.String(64), primary_key=True),
        sa.Column("model_id", sa.String(200), primary_key=True),
        sa.Column("n_items", sa.BigInteger, nullable=False),
        sa.Column("n_bytes", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in ("meta", "usage", "invites", "classifier_participants", "classifiers", "items", "models", "tokens",
                  "participants"):
        op.drop_table(table)
