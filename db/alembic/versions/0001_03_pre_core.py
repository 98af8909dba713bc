"""the core tables and the guarantees they keep by themselves."""

from db.migrate import run_migration_file

revision = "0001_03"
down_revision = "0001_02"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0001_03_pre_core.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
