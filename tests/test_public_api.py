"""The public names of bastion and of each public subpackage are pinned.

A change here is a change to the public API: make it on purpose, and list it in
CHANGELOG.md.
"""

import importlib
import importlib.metadata
import importlib.resources

import pytest

PUBLIC_NAMES = {
    "bastion": [
        "Bastion",
        "BastionError",
        "ErrorCode",
        "RequestContext",
        "Settings",
        "create_app",
        "current_context",
        "install",
    ],
    "bastion.errors": [
        "PROBLEM_CONTENT_TYPE",
        "BastionError",
        "ConfigurationError",
        "Conflict",
        "DependencyFailure",
        "ErrorCode",
        "FieldError",
        "Forbidden",
        "InvalidInput",
        "NotFound",
        "PreconditionFailed",
        "ServiceUnavailable",
        "Unauthenticated",
        "code_for_status",
        "problem_body",
        "problem_responses",
    ],
    "bastion.observability": [
        "AccessLogger",
        "HealthCheck",
        "HealthRegistry",
        "HttpMetrics",
        "LogMasker",
        "MetricsEndpoint",
        "RequestMiddleware",
        "Tracing",
        "TracingTransport",
        "build_tracing",
        "configure_logging",
        "consumer_span",
        "extract_context",
        "inject_headers",
        "install_exception_handlers",
        "instrument_httpx",
        "instrument_redis",
        "problem_response",
        "producer_span",
    ],
    "bastion.data": [
        "AppliedRevision",
        "Database",
        "DestructiveChange",
        "DestructiveChangeRefused",
        "HistoryRecord",
        "LintFinding",
        "MigrationError",
        "MigrationTree",
        "Migrator",
        "RetryPolicy",
        "RevisionCheck",
        "RevisionInfo",
        "TransactionConflict",
        "TreeStatus",
        "VerificationReport",
        "lint_tree",
        "run_alembic_env",
        "run_transaction",
        "transaction",
        "use_database",
    ],
    "bastion.observability.metrics": [
        "AUTH_ATTEMPTS",
        "AUTH_LOCKOUTS",
        "CACHE_REQUESTS",
        "CIRCUIT_STATE",
        "CIRCUIT_TRANSITIONS",
        "DB_CONNECTION_COUNT",
        "DB_CONNECTION_MAX",
        "DB_CONNECTION_OVERFLOW",
        "DB_CONNECTION_PENDING_REQUESTS",
        "DB_CONNECTION_TIMEOUTS",
        "DB_CONNECTION_WAIT_TIME",
        "DB_OPERATION_DURATION",
        "DB_SLOW_QUERIES",
        "DB_TRANSACTION_FAILURES",
        "DB_TRANSACTION_RETRIES",
        "DEPENDENCY_DEGRADED",
        "DEPENDENCY_OUTAGES",
        "HEALTH_CHECK_UP",
        "HTTP_ACTIVE_REQUESTS",
        "HTTP_DEADLINE_EXCEEDED",
        "HTTP_REQUEST_BODY_SIZE",
        "HTTP_REQUEST_DURATION",
        "HTTP_RESPONSE_BODY_SIZE",
        "HTTP_TENANT_REQUEST_DURATION",
        "IDENTITY_DENY_LIST_CHECKS",
        "IDENTITY_MAIL_MESSAGES",
        "IDENTITY_OIDC_FETCHES",
        "IDENTITY_PASSWORD_HASH_DURATION",
        "IDENTITY_PASSWORD_HASH_REJECTED",
        "IDENTITY_PASSWORD_REHASHES",
        "IDENTITY_PURGED_ROWS",
        "IDENTITY_SECURITY_EVENTS",
        "MIGRATIONS_APPLIED",
        "OUTBOX_LAG",
        "OUTBOX_PENDING",
        "RATELIMIT_DECISIONS",
        "RATELIMIT_STORE_ERRORS",
        "READY",
        "RESILIENCE_CALLS",
        "RESILIENCE_FALLBACKS",
        "RETRIES",
        "RETRY_BUDGET_EXHAUSTED",
        "TENANT_QUOTA_REJECTIONS",
    ],
    "bastion.identity": [
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
    ],
    "bastion.ratelimit": [
        "AccountLocked",
        "Limit",
        "LimitStore",
        "LimitsUnavailable",
        "LockoutEvent",
        "LoginThrottle",
        "MemoryStore",
        "Policy",
        "QuotaCounter",
        "QuotaExceeded",
        "QuotaVerdict",
        "Quotas",
        "RateLimitMiddleware",
        "RateLimited",
        "RateLimiter",
        "RedisStore",
        "Rule",
        "StoreUnavailable",
        "Verdict",
        "parse_limits",
        "rate_limit",
    ],
    "bastion.resilience": [
        "DEFAULT_ORDER",
        "Bulkhead",
        "BulkheadFullError",
        "CircuitBreaker",
        "CircuitOpenError",
        "CircuitSnapshot",
        "CircuitState",
        "Degradation",
        "DependencyError",
        "DependencyTimeoutError",
        "Pipeline",
        "PipelineCall",
        "Policy",
        "RequestTimeout",
        "Resilience",
        "RetryBudget",
        "current_resilience",
        "default_policy",
        "http_client",
        "is_transient",
        "pipeline",
        "remaining_time",
        "request_deadline",
        "resilient",
        "resolve_policy",
        "use_resilience",
    ],
    "bastion.tenancy": [
        "TenantId",
        "current_tenant_id",
        "scoped",
    ],
    "bastion.testing": [
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
    ],
}


@pytest.mark.parametrize("module_name", sorted(PUBLIC_NAMES))
class TestPublicNames:
    def test_all_is_pinned(self, module_name):
        """__all__ lists exactly the pinned names, in the pinned order."""
        module = importlib.import_module(module_name)
        assert PUBLIC_NAMES[module_name] == list(module.__all__)

    def test_every_name_resolves(self, module_name):
        """Every name in __all__ is an attribute of the module."""
        module = importlib.import_module(module_name)
        assert [] == [name for name in module.__all__ if not hasattr(module, name)]

    def test_names_are_unique(self, module_name):
        """No name is listed twice."""
        module = importlib.import_module(module_name)
        assert len(set(module.__all__)) == len(module.__all__)

    def test_star_import_gives_only_public_names(self, module_name):
        """`from module import *` brings exactly __all__ and nothing private."""
        namespace: dict[str, object] = {}
        exec(f"from {module_name} import *", namespace)  # noqa: S102 -- a fixed module name
        namespace.pop("__builtins__")
        assert sorted(PUBLIC_NAMES[module_name]) == sorted(namespace)


class TestTopLevel:
    def test_top_level_reexports_are_the_canonical_objects(self):
        """bastion's names are the same objects as in the modules that define them."""
        import bastion
        import bastion.context
        import bastion.errors
        import bastion.settings

        assert bastion.errors.BastionError is bastion.BastionError
        assert bastion.errors.ErrorCode is bastion.ErrorCode
        assert bastion.settings.Settings is bastion.Settings
        assert bastion.context.current_context is bastion.current_context

    def test_version_matches_the_distribution(self):
        """bastion.__version__ is the installed distribution's version."""
        import bastion

        assert importlib.metadata.version("bastion") == bastion.__version__

    def test_ships_type_information(self):
        """The package carries py.typed, so type checkers read its annotations."""
        import bastion

        assert (importlib.resources.files(bastion) / "py.typed").is_file()
