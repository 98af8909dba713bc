"""A trader's cancel reaches the venue (trading.request_cancel); close_all, close_position
and a HARD breaker cancel the open entries; client order ids carry the database's tag"""

from db.migrate import run_migration_file

revision = "0004_13"
down_revision = "0004_12"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0004_13_pre_cancels_reach_the_venue.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
