"""The risk gate at the market price: a signal price below the latest close is not used;
MAX_VOLATILITY without data refuses; hedge legs counted gross"""

from db.migrate import run_migration_file

revision = "0004_08"
down_revision = "0004_07"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0004_08_pre_gate_at_market.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
