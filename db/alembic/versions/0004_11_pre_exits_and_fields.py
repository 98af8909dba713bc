"""Exits never exceed what is held; a HARD breaker closes what fills after it; the SQL API
refuses fields it does not know"""

from db.migrate import run_migration_file

revision = "0004_11"
down_revision = "0004_10"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0004_11_pre_exits_and_fields.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
