"""Test helpers for bastion services: run an app's lifespan and talk to it in-process."""

from bastion.testing._client import lifespan_client

__all__ = ["lifespan_client"]
