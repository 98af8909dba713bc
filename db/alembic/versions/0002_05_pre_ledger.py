"""the ledger. Fills change positions, cash, realized P&L and orders"""

from db.migrate import run_migration_file

revision = "0002_05"
down_revision = "0002_04"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0002_05_pre_ledger.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
