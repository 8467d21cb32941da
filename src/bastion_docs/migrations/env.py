from bastion.data import run_alembic_env
from bastion_docs.models import metadata

run_alembic_env(metadata)
