"""Drift repair: crash-loop backoff on replicas, and the revision that served each usage row.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-12
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("replicas", sa.Column("crash_count", sa.Integer(), server_default="0", nullable=False))
    op.add_column("replicas", sa.Column("retry_after", sa.DateTime(timezone=True), nullable=True))
    op.add_column("replicas", sa.Column("crashed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("replicas", sa.Column("crash_exit_code", sa.Integer(), nullable=True))
    op.add_column("replicas", sa.Column("crash_log", sa.Text(), nullable=True))
    op.add_column("replicas", sa.Column("crash_spec_hash", sa.Text(), nullable=True))
    # Usage rows so far have no revision (NULL): they keep rolling up by key, model and hour as before.
    op.add_column("usage", sa.Column("revision", sa.Text(), nullable=True))
    op.drop_index("uq_usage_api_key_id_model_hour", table_name="usage")
    op.create_index("uq_usage_api_key_id_model_revision_hour", "usage", ["api_key_id", "model", "revision", "hour"],
                    unique=True, postgresql_nulls_not_distinct=True)


def downgrade() -> None:
    # Rows that differ only by revision are merged back into one per key, model and hour.
    op.execute("""
        WITH merged AS (
            DELETE FROM usage RETURNING api_key_id, model, hour, requests, errors, prompt_tokens,
                                        completion_tokens, latency_ms_sum, ttft_ms_sum)
        INSERT INTO usage (api_key_id, model, hour, requests, errors, prompt_tokens, completion_tokens,
                           latency_ms_sum, ttft_ms_sum)
        SELECT api_key_id, model, hour, sum(requests), sum(errors), sum(prompt_tokens), sum(completion_tokens),
               sum(latency_ms_sum), sum(ttft_ms_sum)
        FROM merged GROUP BY api_key_id, model, hour
    """)
    op.drop_index("uq_usage_api_key_id_model_revision_hour", table_name="usage")
    op.create_index("uq_usage_api_key_id_model_hour", "usage", ["api_key_id", "model", "hour"], unique=True,
                    postgresql_nulls_not_distinct=True)
    op.drop_column("usage", "revision")
    for column in ("crash_spec_hash", "crash_log", "crash_exit_code", "crashed_at", "retry_after", "crash_count"):
        op.drop_column("replicas", column)
