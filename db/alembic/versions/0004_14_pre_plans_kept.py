"""trading._row_exits keeps its plan on PostgreSQL 15 to 17 (PL/pgSQL instead of SQL)"""

from db.migrate import run_migration_file

revision = "0004_14"
down_revision = "0004_13"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0004_14_pre_plans_kept.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
