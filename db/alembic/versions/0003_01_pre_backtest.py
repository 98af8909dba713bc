"""backtest runs as rows: runs, metrics, equity curves, Monte Carlo, walk-forward; backtest.step"""

from db.migrate import run_migration_file

revision = "0003_01"
down_revision = "0002_07"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0003_01_pre_backtest.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
