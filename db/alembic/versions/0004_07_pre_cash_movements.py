"""Cash that moves outside any fill (fees, financing, dividends, interest, deposits,
withdrawals): trading.cash_movements and trading.book_cash"""

from db.migrate import run_migration_file

revision = "0004_07"
down_revision = "0004_06"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0004_07_pre_cash_movements.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
