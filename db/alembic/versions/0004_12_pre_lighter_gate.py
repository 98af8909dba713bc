"""The risk gate reads less for the same decisions: MAX_CORRELATION in one statement, the
exposures read once per signal"""

from db.migrate import run_migration_file

revision = "0004_12"
down_revision = "0004_11"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0004_12_pre_lighter_gate.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
