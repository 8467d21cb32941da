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
from bastion.identity._directory import (
    Membership,
    TenantRecord,
    UserRecord,
    add_membership,
    create_tenant,
    create_user,
    find_tenant,
    find_user_by_email,
    get_user,
    membership_role,
    normalise_email,
    user_memberships,
)
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
    BEARER_CHALLENGE,
    Authenticated,
    Principal,
    PrincipalKind,
    authenticated,
    bind_principal,
    clear_auth_failure,
    current_principal,
    record_auth_failure,
    unbind_principal,
)
from bastion.identity._purge import purge_expired
from bastion.identity._rbac import (
    Authorizer,
    Roles,
    authenticated_operations,
    current_authorizer,
    grants,
    protected_operations,
    require,
    requires,
    use_authorizer,
)
from bastion.identity._runtime import Identity
from bastion.identity._tables import (
    api_keys,
    identity_metadata,
    memberships,
    one_time_tokens,
    refresh_families,
    refresh_tokens,
    tenants,
    users,
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
    "BEARER_CHALLENGE",
    "INVITATION_TEMPLATE",
    "PASSWORD_RESET_TEMPLATE",
    "VERIFICATION_TEMPLATE",
    "AccessClaims",
    "AccessTokens",
    "ApiKeyRecord",
    "ApiKeyVerification",
    "ApiKeys",
    "Authenticated",
    "Authorizer",
    "ClaimMapping",
    "CreatedApiKey",
    "Identity",
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
    "Membership",
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
    "TenantRecord",
    "TokenDenyList",
    "TokenPurpose",
    "UserRecord",
    "add_membership",
    "api_keys",
    "authenticated",
    "authenticated_operations",
    "bind_principal",
    "clear_auth_failure",
    "create_tenant",
    "create_user",
    "current_authorizer",
    "current_principal",
    "emit_security_event",
    "find_tenant",
    "find_user_by_email",
    "generate_jwks",
    "get_user",
    "grants",
    "identity_metadata",
    "jwks_route",
    "log_security_event",
    "membership_role",
    "memberships",
    "normalise_email",
    "normalise_password",
    "on_security_event",
    "one_time_tokens",
    "protected_operations",
    "purge_expired",
    "record_auth_failure",
    "refresh_families",
    "refresh_tokens",
    "remove_security_listener",
    "require",
    "requires",
    "rotate_jwks",
    "tenants",
    "unbind_principal",
    "use_authorizer",
    "user_memberships",
    "users",
]
