"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
"""

from db.migrate import run_migration_file

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_file("${up_revision}_pre_CHANGE_ME.sql")


def downgrade() -> None:
    raise NotImplementedError("MMATS migrations are forward-only")
