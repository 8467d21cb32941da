"""Test helpers for bastion services: run an app's lifespan, talk to it, count its queries."""

from bastion.testing._client import lifespan_client
from bastion.testing._queries import QueryCounter, count_queries

__all__ = ["QueryCounter", "count_queries", "lifespan_client"]
