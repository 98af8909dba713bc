"""apply_fill records a new fill with INSERT ... ON CONFLICT on its unique constraint
instead of looking it up first (no plan can make it read every fill of the account)"""

from db.migrate import run_migration_file

revision = "0004_05"
down_revision = "0004_04"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0004_05_pre_fill_by_constraint.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
