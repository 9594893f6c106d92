"""Token limits per API key: tokens a minute and tokens a UTC day, and an index to sum a key's usage by hour.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL: no limit, so every existing key keeps working as before.
    op.add_column("api_keys", sa.Column("tpm_limit", sa.Integer(), nullable=True))
    op.add_column("api_keys", sa.Column("tpd_limit", sa.BigInteger(), nullable=True))
    # The key cache sums a limited key's hour rows of today twice a second: without this it would read every
    # row the key ever had (the unique index leads with the key, then model and revision).
    op.create_index("ix_usage_api_key_id_hour", "usage", ["api_key_id", "hour"])


def downgrade() -> None:
    op.drop_index("ix_usage_api_key_id_hour", table_name="usage")
    op.drop_column("api_keys", "tpd_limit")
    op.drop_column("api_keys", "tpm_limit")
