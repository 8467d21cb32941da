"""Builds the identity component from the settings: the :class:`Identity` install() keeps.

:func:`build_identity` makes every part and opens nothing; :func:`start_identity`
and :func:`stop_identity` are the start-up and shutdown hooks, and
:func:`identity_checks` the readiness checks of the parts that have a dependency
of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from bastion.errors import ConfigurationError
from bastion.identity._accounts import SqlOneTimeTokenStore
from bastion.identity._api_key_store import ApiKeyStore
from bastion.identity._api_keys import ApiKeys, LastUsedPolicy
from bastion.identity._deny_list import RedisDenyList
from bastion.identity._directory import membership_role
from bastion.identity._keys import KeySet
from bastion.identity._mail import LoggingSender, MailSender, SmtpSender
from bastion.identity._oidc import ClaimMapping, OidcProvider
from bastion.identity._one_time import OneTimeTokens, TokenPurpose
from bastion.identity._passwords import PasswordHasher, PasswordPolicy
from bastion.identity._permission_cache import PermissionCache
from bastion.identity._purge import run_purges
from bastion.identity._rbac import Authorizer, Roles, current_authorizer, use_authorizer
from bastion.identity._runtime import Identity
from bastion.identity._tokens import AccessTokens
from bastion.tenancy._quotas import TenantQuotas

if TYPE_CHECKING:
    from bastion.data import Database
    from bastion.ratelimit import RateLimiter
    from bastion.resilience import Resilience
    from bastion.settings import IdentitySettings, OidcProviderSettings, Settings

__all__ = ["IdentityCheck", "build_identity", "identity_checks", "start_identity", "stop_identity"]

logger = structlog.get_logger("bastion.identity")


@dataclass(frozen=True, slots=True)
class IdentityCheck:
    """A readiness check of one identity dependency.

    Attributes:
        name: its name in ``/health/ready``.
        check: raises when the dependency cannot serve.
        critical: whether a failure makes the instance not ready.
    """

    name: str
    check: Callable[[], Awaitable[None]]
    critical: bool


def build_identity(
    settings: Settings,
    *,
    database: Database,
    redis: Any = None,
    limiter: RateLimiter | None = None,
    resilience: Resilience | None = None,
) -> Identity:
    """Build every part of the identity component; nothing is opened yet.

    Example:
        >>> identity = build_identity(settings, database=database, redis=client)
        >>> await start_identity(identity)

    Args:
        settings: the effective settings, after
            :func:`bastion._secrets.enforce_secrets` (which fills in the
            development pepper and API-key secret).
        database: where accounts, memberships and keys live.
        redis: the client of ``identity.store_url`` (the deny list and the shared
            permission cache), or ``None`` for memory: one instance only, and
            access tokens are then revoked only by expiring.
        limiter: the rate limiter, whose login throttle and quota counters
            identity uses, and which meters each tenant's quotas; ``None`` without
            rate limiting (no quotas then).
        resilience: the registry the SMTP sender's pipeline is registered in.

    Returns:
        The component, ready for :func:`start_identity`.

    Raises:
        ConfigurationError: a secret is missing (production, or without
            ``enforce_secrets``), a key or a role is invalid, or an OIDC provider
            is misconfigured.
    """
    section = settings.identity
    prefix = settings.redis.key_prefix
    keys = KeySet.from_settings(section.tokens, environment=settings.environment)
    roles = Roles(
        {name: role.permissions for name, role in section.roles.items()},
        inherits={name: role.inherits for name, role in section.roles.items()},
    )
    permissions = PermissionCache.from_settings(
        section.authorization,
        roles.loader(_role_assignments(database)),
        _roles_loader(roles),
        redis=redis,
        key_prefix=prefix,
    )
    deny_list: RedisDenyList | None = None
    if redis is not None and section.deny_list.enabled:
        deny_list = RedisDenyList.from_settings(
            section,
            redis,
            key_prefix=prefix,
            timeout=section.deny_list.timeout,
            fail_open=section.deny_list.fail_open,
        )
    api_keys = _api_keys(section)
    return Identity(
        settings=settings,
        database=database,
        hasher=PasswordHasher.from_settings(section.passwords),
        policy=PasswordPolicy.from_settings(section.passwords),
        keys=keys,
        tokens=AccessTokens.from_settings(section.tokens, keys=keys, deny_list=deny_list),
        api_keys=api_keys,
        one_time=OneTimeTokens(SqlOneTimeTokenStore(database), ttls=_one_time_ttls(section)),
        roles=roles,
        authorizer=Authorizer(roles, permissions),
        permissions=permissions,
        mail=_mail(section, resilience),
        deny_list=deny_list,
        login=limiter.login if limiter is not None else None,
        quotas=limiter.quotas if limiter is not None else None,
        oidc={
            name: _oidc_provider(name, provider, leeway=section.tokens.leeway)
            for name, provider in section.oidc.items()
        },
        api_key_store=ApiKeyStore(
            database,
            api_keys,
            ttl=section.api_keys.cache_ttl,
            touch_interval=section.api_keys.touch_interval,
            deny_list=deny_list,
        ),
        tenant_quotas=_tenant_quotas(settings, database, limiter),
    )


async def start_identity(identity: Identity) -> None:
    """Start-up: make the authorizer current, subscribe the cache, warm the hasher, start purging.

    The warm-up computes the dummy hash the unknown-account path compares
    against, so the first failed login costs what every other one does.
    """
    use_authorizer(identity.authorizer)
    await identity.permissions.start()
    await identity.hasher.warm_up()
    section = identity.settings.identity
    if section.purge_interval > 0 and identity.purge_task is None:
        identity.purge_task = asyncio.get_running_loop().create_task(
            run_purges(
                identity.database, interval=section.purge_interval, keep=section.purge_after
            ),
            name="bastion-identity-purge",
        )
    logger.info(
        "identity configured",
        algorithm=identity.keys.signing_key.alg,
        key_id=identity.keys.signing_key.kid,
        deny_list=identity.deny_list is not None,
        mail=type(identity.mail).__name__,
        oidc=sorted(identity.oidc),
    )


async def stop_identity(identity: Identity) -> None:
    """Shutdown: close what :func:`build_identity` made (not the Redis client or database)."""
    if identity.purge_task is not None:
        # Cancelled first: a purge in flight rolls back, before the database closes.
        identity.purge_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await identity.purge_task
        identity.purge_task = None
    with contextlib.suppress(ConfigurationError):
        # Another app in the process may have made its own authorizer current since.
        if current_authorizer() is identity.authorizer:
            use_authorizer(None)
    await identity.permissions.aclose()
    if identity.deny_list is not None:
        await identity.deny_list.aclose()
    for provider in identity.oidc.values():
        await provider.aclose()
    if isinstance(identity.mail, SmtpSender):
        await identity.mail.aclose()
    if identity.api_key_store is not None:
        await identity.api_key_store.aclose()
    await identity.hasher.aclose()


def identity_checks(identity: Identity, *, shared: bool) -> list[IdentityCheck]:
    """Return the readiness checks of identity's own dependencies.

    Args:
        identity: the component.
        shared: whether its state is in Redis (else the cache has nothing to check).

    The permission cache falls back to the database, an issuer's outage only
    affects its own tokens, and mail is sent after the response matters least:
    none of them makes an instance unready. The deny list does when it fails
    closed, since every authenticated request then answers 503.
    """
    checks: list[IdentityCheck] = []
    if identity.deny_list is not None:
        checks.append(
            IdentityCheck(
                "identity_deny_list",
                _raising(identity.deny_list.ping, "the token deny list"),
                critical=not identity.settings.identity.deny_list.fail_open,
            )
        )
    if shared:
        checks.append(
            IdentityCheck(
                "identity_permission_cache",
                _raising(identity.permissions.ping, "the permission cache"),
                critical=False,
            )
        )
    if isinstance(identity.mail, SmtpSender):
        checks.append(IdentityCheck("identity_smtp", identity.mail.ping, critical=False))
    for name, provider in identity.oidc.items():
        checks.append(
            IdentityCheck(f"oidc_{name}", _raising(provider.ping, f"issuer {name}"), False)
        )
    return checks


def _raising(ping: Callable[[], Awaitable[bool]], what: str) -> Callable[[], Awaitable[None]]:
    """Turn a ``ping() -> bool`` into a check that raises (how the health registry fails one)."""

    async def check() -> None:
        if not await ping():
            raise ConnectionError(f"{what} does not answer")

    return check


def _role_assignments(database: Database) -> Callable[[str, str], Awaitable[Iterable[str]]]:
    """The role names of a user in a tenant, read from the memberships table."""

    async def assignments(user_id: str, tenant_id: str) -> Iterable[str]:
        try:
            user, tenant = uuid.UUID(user_id), uuid.UUID(tenant_id)
        except ValueError:
            # An external issuer's subject or tenant is never one of ours: no membership.
            return ()
        async with database.sessions() as session:
            role = await membership_role(session, user, tenant)
        return () if role is None else (role,)

    return assignments


def _roles_loader(roles: Roles) -> Callable[[str | None], Awaitable[Mapping[str, Iterable[str]]]]:
    async def load(tenant_id: str | None) -> Mapping[str, Iterable[str]]:
        # Roles come from the settings, the same in every tenant.
        return roles.as_mapping()

    return load


def _api_keys(section: IdentitySettings) -> ApiKeys:
    settings = section.api_keys
    if settings.secret is None:
        raise ConfigurationError(
            "identity.api_keys.secret is not set (BASTION_IDENTITY__API_KEYS__SECRET);"
            " install() generates one in development only"
        )
    return ApiKeys(
        settings.secret,
        previous_secrets=settings.previous_secrets,
        prefix=settings.prefix,
        last_used=LastUsedPolicy(settings.touch_interval),
    )


def _tenant_quotas(
    settings: Settings, database: Database, limiter: RateLimiter | None
) -> TenantQuotas | None:
    if limiter is None or limiter.quotas is None:
        return None
    # Attached to the limiter: its middleware meters a tenant's quotas in the round
    # trip that decides its rate limits.
    return TenantQuotas.from_settings(
        settings, quotas=limiter.quotas, database=database, limiter=limiter
    )


def _one_time_ttls(section: IdentitySettings) -> dict[TokenPurpose, float]:
    lives = section.one_time
    return {
        TokenPurpose.EMAIL_VERIFICATION: lives.verify_email_ttl,
        TokenPurpose.PASSWORD_RESET: lives.password_reset_ttl,
        TokenPurpose.INVITATION: lives.invitation_ttl,
    }


def _mail(section: IdentitySettings, resilience: Resilience | None) -> MailSender:
    mail = section.mail
    if mail.sender == "logging":
        return LoggingSender()
    return SmtpSender(
        mail.smtp_host,
        mail.smtp_port,
        from_address=mail.from_address,
        from_name=mail.from_name,
        security=mail.smtp_security,
        username=mail.smtp_username,
        password=mail.smtp_password,
        timeout=mail.smtp_timeout,
        pipeline=resilience.register("smtp", "custom") if resilience is not None else None,
    )


def _oidc_provider(name: str, settings: OidcProviderSettings, *, leeway: float) -> OidcProvider:
    role_map = {claimed: (role,) for claimed, role in settings.role_map.items()}
    return OidcProvider(
        settings.issuer,
        audience=settings.audience,
        mapping=ClaimMapping(
            subject_claim=settings.subject_claim,
            tenant_claim=settings.tenant_claim,
            tenant=settings.default_tenant,
            roles_claim=settings.roles_claim,
            role_map=role_map or None,
            # Keeps an issuer's subjects apart from local user ids in logs and limits;
            # routes tell external principals by Principal.issuer, not by this.
            subject_prefix=f"{name}:",
        ),
        algorithms=settings.algorithms,
        name=name,
        dependency=f"oidc_{name}",
        jwks_uri=settings.jwks_uri,
        leeway=leeway,
    )
