"""News sentiment for strategies: market.news_sentiment"""

from db.migrate import run_migration_file

revision = "0004_10"
down_revision = "0004_09"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("0004_10_pre_news_sentiment.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
