"""a bar's protection takes the account locks first: no second exit while a strategy's
close for the same position is being decided"""

from db.migrate import run_migration_file

revision = "0004_03"
down_revision = "0004_02"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0004_03_pre_protection_locks.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
