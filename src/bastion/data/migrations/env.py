"""Alembic environment of bastion's own tables, recorded in ``bastion_alembic_version``."""

from bastion.data import run_alembic_env
from bastion.data._migrations import BASTION_VERSION_TABLE

# No metadata yet: bastion's revisions are written by hand. The version table is
# named for the plain `alembic` command; under bastion the migrator names it.
run_alembic_env(None, version_table=BASTION_VERSION_TABLE)
