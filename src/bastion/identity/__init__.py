"""Identity: passwords, access tokens and their keys, roles, the permission cache, events.

This is the library layer of the identity component. Accounts, tenants and
their routes (``/v1/auth/*``, API keys, members), refresh-token families and
the wiring into ``bastion.install`` build on it (docs/identity.md says what is
in place and what is not).

Example:
    >>> hasher = PasswordHasher.from_settings(settings.identity.passwords)
    >>> stored = await hasher.hash("correct horse battery staple")
    >>> tokens = AccessTokens.from_settings(settings.identity.tokens)
    >>> issued = tokens.issue("user-1", "tenant-1", ["member"])
    >>> claims = tokens.verify(issued.token)
"""

from bastion.identity._api_keys import (
    ApiKeyRecord,
    ApiKeys,
    ApiKeyVerification,
    CreatedApiKey,
    InvalidApiKey,
    LastUsedPolicy,
)
from bastion.identity._deny_list import RedisDenyList
from bastion.identity._events import (
    SecurityEvent,
    SecurityEventKind,
    SecurityOutcome,
    emit_security_event,
    log_security_event,
    on_security_event,
    remove_security_listener,
)
from bastion.identity._keys import KeySet, SigningKey, generate_jwks, jwks_route, rotate_jwks
from bastion.identity._mail import (
    INVITATION_TEMPLATE,
    PASSWORD_RESET_TEMPLATE,
    VERIFICATION_TEMPLATE,
    LoggingSender,
    MailDeliveryError,
    MailSender,
    MailTemplate,
    OutgoingMail,
    SmtpSender,
)
from bastion.identity._oidc import ClaimMapping, OidcClaims, OidcProvider, OidcUnavailable
from bastion.identity._one_time import (
    InvalidOneTimeToken,
    IssuedOneTimeToken,
    MemoryOneTimeTokenStore,
    OneTimeTokenRecord,
    OneTimeTokens,
    OneTimeTokenStore,
    TokenPurpose,
)
from bastion.identity._passwords import (
    PasswordHasher,
    PasswordHashingBusy,
    PasswordPolicy,
    PasswordVerification,
    normalise_password,
)
from bastion.identity._permission_cache import PermissionCache, PermissionsLoader, RolesLoader
from bastion.identity._principal import (
    Principal,
    PrincipalKind,
    bind_principal,
    current_principal,
    unbind_principal,
)
from bastion.identity._rbac import (
    Authorizer,
    Roles,
    current_authorizer,
    grants,
    protected_operations,
    require,
    requires,
    use_authorizer,
)
from bastion.identity._tokens import (
    AccessClaims,
    AccessTokens,
    InvalidToken,
    IssuedToken,
    MemoryDenyList,
    TokenDenyList,
)

__all__ = [
    "INVITATION_TEMPLATE",
    "PASSWORD_RESET_TEMPLATE",
    "VERIFICATION_TEMPLATE",
    "AccessClaims",
    "AccessTokens",
    "ApiKeyRecord",
    "ApiKeyVerification",
    "ApiKeys",
    "Authorizer",
    "ClaimMapping",
    "CreatedApiKey",
    "InvalidApiKey",
    "InvalidOneTimeToken",
    "InvalidToken",
    "IssuedOneTimeToken",
    "IssuedToken",
    "KeySet",
    "LastUsedPolicy",
    "LoggingSender",
    "MailDeliveryError",
    "MailSender",
    "MailTemplate",
    "MemoryDenyList",
    "MemoryOneTimeTokenStore",
    "OidcClaims",
    "OidcProvider",
    "OidcUnavailable",
    "OneTimeTokenRecord",
    "OneTimeTokenStore",
    "OneTimeTokens",
    "OutgoingMail",
    "PasswordHasher",
    "PasswordHashingBusy",
    "PasswordPolicy",
    "PasswordVerification",
    "PermissionCache",
    "PermissionsLoader",
    "Principal",
    "PrincipalKind",
    "RedisDenyList",
    "Roles",
    "RolesLoader",
    "SecurityEvent",
    "SecurityEventKind",
    "SecurityOutcome",
    "SigningKey",
    "SmtpSender",
    "TokenDenyList",
    "TokenPurpose",
    "bind_principal",
    "current_authorizer",
    "current_principal",
    "emit_security_event",
    "generate_jwks",
    "grants",
    "jwks_route",
    "log_security_event",
    "normalise_password",
    "on_security_event",
    "protected_operations",
    "remove_security_listener",
    "require",
    "requires",
    "rotate_jwks",
    "unbind_principal",
    "use_authorizer",
]
