"""accounts, strategy assignment, and the signal path:"""

from db.migrate import run_migration_file

revision = "0002_04"
down_revision = "0002_03"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0002_04_pre_signals.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
