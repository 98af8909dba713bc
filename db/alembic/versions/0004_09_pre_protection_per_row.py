"""Protection and emergency closes per position row: pending exits matched to their own row;
no bar older than a position judges or marks it"""

from db.migrate import run_migration_file

revision = "0004_09"
down_revision = "0004_08"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0004_09_pre_protection_per_row.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
