"""roles, schemas and, where the server offers it, TimescaleDB."""

from db.migrate import run_migration_file

revision = "0001_01"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0001_01_pre_roles_schemas.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
