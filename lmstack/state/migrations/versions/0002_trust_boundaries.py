"""Trust boundaries: API key scopes, and a per-replica engine key that only the gateway holds.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Keys made before scopes existed keep what they could always do safely: /v1 and their own usage.
    op.add_column("api_keys", sa.Column("scopes", postgresql.ARRAY(sa.Text()), server_default=sa.text("'{}'"),
                                        nullable=False))
    # NULL for replicas started before engine keys: the gateway then sends no key (their engine asks none).
    op.add_column("replicas", sa.Column("engine_key", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("replicas", "engine_key")
    op.drop_column("api_keys", "scopes")
