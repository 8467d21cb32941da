"""What ``bastion.install`` builds for identity: one object every identity route reads.

Routes reach it as ``request.app.state.bastion.identity``; applications reach
it as ``runtime.identity`` (``None`` when ``identity.enabled`` is off or the
database is off: accounts live in the database).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bastion.data import Database
    from bastion.identity._api_key_store import ApiKeyStore
    from bastion.identity._api_keys import ApiKeys
    from bastion.identity._deny_list import RedisDenyList
    from bastion.identity._keys import KeySet
    from bastion.identity._mail import MailSender
    from bastion.identity._oidc import OidcProvider
    from bastion.identity._one_time import OneTimeTokens
    from bastion.identity._passwords import PasswordHasher, PasswordPolicy
    from bastion.identity._permission_cache import PermissionCache
    from bastion.identity._rbac import Authorizer, Roles
    from bastion.identity._tokens import AccessTokens
    from bastion.ratelimit import LoginThrottle, Quotas
    from bastion.settings import Settings
    from bastion.tenancy._quotas import TenantQuotas

__all__ = ["Identity"]


@dataclass(slots=True)
class Identity:
    """The identity component of an installed app.

    Attributes:
        settings: the effective settings (``identity`` and ``tenancy`` sections).
        database: where accounts, tenants and tokens live.
        hasher: password hashing in a bounded worker pool.
        policy: the password policy.
        keys: the signing keys (the JWKS route publishes their public halves).
        tokens: issues and verifies access tokens (with the deny list, if any).
        api_keys: makes and verifies API keys.
        one_time: single-use tokens (verification, reset, invitation) in the database.
        roles: the roles of ``identity.roles``.
        authorizer: what ``require`` consults.
        permissions: the permission cache (Redis or memory), loading from memberships.
        mail: where identity's e-mails go.
        deny_list: revoked access tokens in Redis, or ``None``.
        login: failed-login throttling and lockout, or ``None`` without rate limiting.
        quotas: quota counters, or ``None`` without rate limiting.
        oidc: external issuers by name.
        api_key_store: API-key records by public id, cached (what the middleware
            looks keys up in); ``None`` only when built by hand without one.
        tenant_quotas: each tenant's quotas and rate-limit overrides, metered by
            the rate limiter; ``None`` without rate limiting.
        purge_task: the periodic purge of spent tokens, while started and
            ``identity.purge_interval`` is not 0.
    """

    settings: Settings
    database: Database
    hasher: PasswordHasher
    policy: PasswordPolicy
    keys: KeySet
    tokens: AccessTokens
    api_keys: ApiKeys
    one_time: OneTimeTokens
    roles: Roles
    authorizer: Authorizer
    permissions: PermissionCache
    mail: MailSender
    deny_list: RedisDenyList | None = None
    login: LoginThrottle | None = None
    quotas: Quotas | None = None
    oidc: dict[str, OidcProvider] = field(default_factory=dict)
    api_key_store: ApiKeyStore | None = None
    tenant_quotas: TenantQuotas | None = None
    purge_task: asyncio.Task[None] | None = None
