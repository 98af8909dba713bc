"""who may call the trading core. Every write goes through these"""

from db.migrate import run_migration_file

revision = "0002_07"
down_revision = "0002_06"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0002_07_pre_trading_grants.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
