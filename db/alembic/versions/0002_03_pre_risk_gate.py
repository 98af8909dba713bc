"""risk limits (set with functions, kept with their history), the breaker,"""

from db.migrate import run_migration_file

revision = "0002_03"
down_revision = "0002_02"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0002_03_pre_risk_gate.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
