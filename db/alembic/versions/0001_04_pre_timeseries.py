"""time-series storage. With TimescaleDB: hypertables, continuous"""

from db.migrate import run_migration_file

revision = "0001_04"
down_revision = "0001_03"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0001_04_pre_timeseries.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
