"""what each role may do. Nobody but mmats_owner writes a table: the"""

from db.migrate import run_migration_file

revision = "0001_05"
down_revision = "0001_04"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0001_05_pre_grants.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
