"""The drain test app at module level, the way ``bastion serve module:app`` users write it."""

from tests.lifecycle.drain_app import create_app

app = create_app()
