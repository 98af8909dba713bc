"""the live and paper runtime: heartbeats, errors, resume points, bar notifications,
the router's queue functions, reconciliation events, encrypted broker credentials"""

from db.migrate import run_migration_file

revision = "0004_01"
down_revision = "0003_02"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0004_01_pre_runtime.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
