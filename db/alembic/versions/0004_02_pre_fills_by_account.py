"""an account's fills found by fill id (the live path's resume reads), not by time"""

from db.migrate import run_migration_file

revision = "0004_02"
down_revision = "0004_01"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0004_02_pre_fills_by_account.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
