"""lookups, input parsing, prices, currency conversion and equity, used by"""

from db.migrate import run_migration_file

revision = "0002_02"
down_revision = "0002_01"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0002_02_pre_trading_helpers.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
