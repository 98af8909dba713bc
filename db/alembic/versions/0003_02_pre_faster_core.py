"""the trading core made cheaper, same behaviour: submit_signal, apply_fill, what they call"""

from db.migrate import run_migration_file

revision = "0003_02"
down_revision = "0003_01"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0003_02_pre_faster_core.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
