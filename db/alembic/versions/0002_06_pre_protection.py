"""bars drive protection (mark to market, stops, targets, trailing stops,"""

from db.migrate import run_migration_file

revision = "0002_06"
down_revision = "0002_05"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0002_06_pre_protection.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
