"""pgmq, from the SQL bundled with the pinned `pgmq` Python package"""

from db.migrate import run_migration_file

revision = "0001_02"
down_revision = "0001_01"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0001_02_pre_pgmq.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
