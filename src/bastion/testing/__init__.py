"""Test helpers for bastion services: run an app, act as its members, count queries, get spans."""

from bastion.testing._client import lifespan_client
from bastion.testing._faults import FaultProxy, ProxyStats
from bastion.testing._identity import TestMember, create_member, member_token
from bastion.testing._llm import FakeLLMProvider, ProviderRequest
from bastion.testing._oidc_issuer import LocalOidcIssuer
from bastion.testing._otlp import OtlpReceiver, ReceivedSpan
from bastion.testing._queries import QueryCounter, count_queries

__all__ = [
    "FakeLLMProvider",
    "FaultProxy",
    "LocalOidcIssuer",
    "OtlpReceiver",
    "ProviderRequest",
    "ProxyStats",
    "QueryCounter",
    "ReceivedSpan",
    "TestMember",
    "count_queries",
    "create_member",
    "lifespan_client",
    "member_token",
]
