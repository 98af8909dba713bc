"""Alembic environment: runs the revisions in db/alembic/versions, each in its own
transaction, under an advisory lock so that concurrent upgrades wait for each other."""

from alembic import context
from sqlalchemy import create_engine, pool, text

from db.migrate import MIGRATION_LOCK_KEY, sqlalchemy_url

config = context.config


def run_migrations_online() -> None:
    engine = create_engine(sqlalchemy_url(config.attributes["url"]), poolclass=pool.NullPool)
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
        connection.commit()
        try:
            context.configure(connection=connection, transaction_per_migration=True,
                              version_table_schema="public")
            with context.begin_transaction():
                context.run_migrations()
            connection.commit()
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})
            connection.commit()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported: MMATS migrations run SQL files")
run_migrations_online()
