"""Internal helpers run in their callers' pinned search path (no SET clause of their
own); backtest.step returns each created order's triggered_at"""

from db.migrate import run_migration_file

revision = "0004_06"
down_revision = "0004_05"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0004_06_pre_lighter_calls.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
