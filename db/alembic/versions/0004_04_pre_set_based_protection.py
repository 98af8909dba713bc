"""bar protection in a fixed number of statements (the same decisions, orders and marks),
and a protective order remembers the bar that fired it (orders.triggered_at)"""

from db.migrate import run_migration_file

revision = "0004_04"
down_revision = "0004_03"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0004_04_pre_set_based_protection.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
