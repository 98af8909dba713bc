"""what the trading core keeps besides the 0001 tables: account settings,"""

from db.migrate import run_migration_file

revision = "0002_01"
down_revision = "0001_05"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0002_01_pre_trading_tables.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
