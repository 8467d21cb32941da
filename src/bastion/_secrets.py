"""Secrets: where they come from (files, ``*_FILE``, OpenBao) and whether they are fit for use.

Sources, in rising precedence, all under the keyword arguments of ``Settings``:
``bastion.toml``, ``BASTION_*`` environment variables, a directory of files
(``secrets.directory``), a ``BASTION_<VARIABLE>_FILE`` variable naming a file,
and an OpenBao/Vault KV v2 secret (``secrets.openbao_*``) read once when the
settings are built. :func:`secret_sources` puts them into pydantic-settings.

Checks: :data:`SECRET_RULES` declares, per secret setting, what it is for and
how much entropy that needs; :func:`check_secrets` reports every secret that is
missing where required, a known placeholder, too weak, or malformed, naming the
variable and never the value. :func:`enforce_secrets` is what start-up calls:
in production any problem is a :class:`~bastion.errors.ConfigurationError`
with one line per problem; in development problems are warnings and a missing
password pepper is generated once and kept under ``secrets.development_directory``.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import enum
import functools
import itertools
import json
import math
import os
import re
import secrets
import string
import tempfile
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final

import structlog
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from bastion.backends import redact_url
from bastion.errors import ConfigurationError

if TYPE_CHECKING:
    from bastion.settings import SecretsSettings, Settings

__all__ = [
    "NOT_CHECKED",
    "SECRET_RULES",
    "SecretKind",
    "SecretProblem",
    "SecretRule",
    "check_secrets",
    "enforce_secrets",
    "estimate_entropy",
    "resolve_development_secrets",
    "secret_sources",
]

logger = structlog.get_logger("bastion.secrets")

ENV_PREFIX: Final = "BASTION_"
FILE_SUFFIX: Final = "_FILE"
DEFAULT_OPENBAO_TIMEOUT: Final = 5.0
GENERATED_BYTES: Final = 48
"""Bytes of a generated development secret: 384 bits, well past the 256 a pepper needs."""


# --- Sources -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Leaf:
    path: tuple[str, ...]
    complex: bool  # a list, dict, set or tuple: its text form is JSON

    @property
    def variable(self) -> str:
        return ENV_PREFIX + "__".join(self.path).upper()


def _unwrap(annotation: Any) -> Any:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(arguments) == 1:
        return _unwrap(arguments[0])
    return annotation


def _leaves(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[_Leaf]:
    for name, field in model.model_fields.items():
        annotation = _unwrap(field.annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _leaves(annotation, (*prefix, name))
        else:
            origin = typing.get_origin(annotation) or annotation
            yield _Leaf((*prefix, name), origin in (list, dict, set, tuple))


@functools.cache
def _variables(settings_cls: type[BaseModel]) -> Mapping[str, _Leaf]:
    # Cached: every Settings() walks the tree twice otherwise (a few hundred fields).
    return types.MappingProxyType({leaf.variable: leaf for leaf in _leaves(settings_cls)})


def _set(tree: dict[str, Any], leaf: _Leaf, text: str, origin: str) -> None:
    value: Any = text
    if leaf.complex:
        try:
            value = json.loads(text)
        except ValueError:
            raise ConfigurationError(
                f"invalid setting {leaf.variable} from {origin}: lists and dicts take JSON"
            ) from None
    node = tree
    for part in leaf.path[:-1]:
        node = node.setdefault(part, {})
    node[leaf.path[-1]] = value


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _read_text(path: Path, variable: str, origin: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigurationError(f"cannot read {variable} from {origin} {path}: {reason}") from None
    # Editors and `echo` add a final newline that is never part of the secret.
    return text.rstrip("\r\n")


def _from_directory(directory: Path, variables: Mapping[str, _Leaf]) -> dict[str, Any]:
    """Files named like a variable (any case: ``/run/secrets`` names are often lower)."""
    if not directory.is_dir():
        raise ConfigurationError(
            f"invalid setting BASTION_SECRETS__DIRECTORY: {directory} is not a directory"
        )
    tree: dict[str, Any] = {}
    for entry in sorted(directory.iterdir()):
        name = entry.name.upper()
        # Other applications' secrets share /run/secrets; only BASTION_* names are ours.
        if not name.startswith(ENV_PREFIX) or not entry.is_file():
            continue
        leaf = variables.get(name)
        if leaf is None:
            raise ConfigurationError(
                f"invalid setting {name} from the secrets directory {directory}: no such setting"
            )
        _set(tree, leaf, _read_text(entry, name, "the secrets directory file"), "a file")
    return tree


def _file_variables(environ: Mapping[str, str], variables: Mapping[str, _Leaf]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, path in sorted(environ.items()):
        upper = name.upper()
        if not (upper.startswith(ENV_PREFIX) and upper.endswith(FILE_SUFFIX)):
            continue
        leaf = variables.get(upper[: -len(FILE_SUFFIX)])
        if leaf is None:
            continue  # not ours (or a setting whose own name ends in _FILE)
        _set(tree, leaf, _read_text(Path(path), leaf.variable, f"the file named by {upper}"), upper)
    return tree


def _from_openbao(config: SecretsSettings, variables: Mapping[str, _Leaf]) -> dict[str, Any]:
    url = config.openbao_url or ""
    shown = redact_url(url)
    where = f"{config.openbao_mount}/{config.openbao_path}"
    try:
        # hvac ships no type hints; optional: only needed when OpenBao is configured.
        import hvac  # type: ignore[import-untyped]  # noqa: PLC0415
        import hvac.exceptions  # type: ignore[import-untyped]  # noqa: PLC0415
        import requests  # noqa: PLC0415 -- hvac's transport, for its exception types
    except ImportError:
        raise ConfigurationError(
            'secrets.openbao_url is set but hvac is not installed: pip install "bastion[openbao]"'
        ) from None
    token = config.openbao_token.get_secret_value() if config.openbao_token else None
    client = hvac.Client(url=url, token=token, timeout=config.openbao_timeout)
    try:
        response = client.secrets.kv.v2.read_secret_version(
            path=config.openbao_path,
            mount_point=config.openbao_mount,
            raise_on_deleted_version=True,
        )
    except hvac.exceptions.InvalidPath:
        raise ConfigurationError(f"OpenBao at {shown} has no secret at {where}") from None
    except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
        raise ConfigurationError(
            f"OpenBao at {shown} refused to read {where}: check BASTION_SECRETS__OPENBAO_TOKEN"
        ) from None
    except hvac.exceptions.VaultError as exc:
        raise ConfigurationError(
            f"OpenBao at {shown} failed to read {where}: {type(exc).__name__}"
        ) from None
    except requests.exceptions.Timeout:
        raise ConfigurationError(
            f"OpenBao at {shown} did not answer within {config.openbao_timeout:g}s"
        ) from None
    except requests.exceptions.RequestException as exc:
        raise ConfigurationError(
            f"OpenBao at {shown} is unreachable ({type(exc).__name__})"
        ) from None
    finally:
        client.adapter.close()
    data = response.get("data", {}).get("data") or {}
    tree: dict[str, Any] = {}
    for key, value in sorted(data.items()):
        leaf = variables.get(str(key).upper())
        if leaf is None:
            raise ConfigurationError(f"invalid setting {key} from OpenBao {where}: no such setting")
        text = value if isinstance(value, str) else json.dumps(value)
        _set(tree, leaf, text, f"OpenBao {where}")
    return tree


def _as_data(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump()
    return value


class _SecretFilesSource(PydanticBaseSettingsSource):
    """The secrets directory, ``*_FILE`` variables and OpenBao, merged in that rising order."""

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        below: tuple[PydanticBaseSettingsSource, ...],
        above: PydanticBaseSettingsSource,
    ) -> None:
        super().__init__(settings_cls)
        self._below = below  # lowest first: where `secrets.*` itself is configured
        self._above = above

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # pragma: no cover -- __call__ builds the whole tree

    def __call__(self) -> dict[str, Any]:
        from bastion.settings import SecretsSettings  # noqa: PLC0415 -- settings imports us

        variables = _variables(self.settings_cls)
        section: dict[str, Any] = {}
        for source in self._below:
            section = _merge(section, _as_data(source().get("secrets") or {}))
        top = _as_data(self._above().get("secrets") or {})
        directory = _merge(section, top).get("directory")
        tree = _from_directory(Path(directory), variables) if directory else {}
        tree = _merge(tree, _file_variables(os.environ, variables))
        section = _merge(_merge(section, tree.get("secrets", {})), top)
        try:
            config = SecretsSettings.model_validate(section)
        except ValidationError as exc:
            first = exc.errors(include_url=False, include_input=False)[0]
            variable = "BASTION_SECRETS__" + "__".join(str(p) for p in first["loc"]).upper()
            raise ConfigurationError(f"invalid setting {variable}: {first['msg']}") from None
        if config.openbao_url:
            tree = _merge(tree, _from_openbao(config, variables))
        return tree


class _WithoutFileVariables(PydanticBaseSettingsSource):
    """The environment source minus ``*_FILE`` variables, which name files rather than values."""

    def __init__(self, settings_cls: type[BaseSettings], env: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self._env = env
        self._tree: dict[str, Any] | None = None

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # pragma: no cover -- __call__ builds the whole tree

    def __call__(self) -> dict[str, Any]:
        # Called twice per build (by the secret source, then by pydantic-settings);
        # the sources are made anew for each build, so keeping the answer is safe.
        if self._tree is None:
            self._tree = self._strip(self._env())
        return copy.deepcopy(self._tree)

    def _strip(self, values: dict[str, Any]) -> dict[str, Any]:
        tree = copy.deepcopy(values)
        for leaf in _variables(self.settings_cls).values():
            node: Any = tree
            for part in leaf.path[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(leaf.path[-1] + "_file", None)
        return tree


def secret_sources(
    settings_cls: type[BaseSettings],
    init: PydanticBaseSettingsSource,
    env: PydanticBaseSettingsSource,
    toml: PydanticBaseSettingsSource,
) -> tuple[PydanticBaseSettingsSource, ...]:
    """The settings sources, highest first, with the secret sources between arguments and env.

    Args:
        settings_cls: the root settings class.
        init: keyword arguments (highest).
        env: ``BASTION_*`` environment variables.
        toml: ``bastion.toml`` (lowest).

    Returns:
        The tuple :meth:`Settings.settings_customise_sources` returns.
    """
    env_values = _WithoutFileVariables(settings_cls, env)
    return (init, _SecretFilesSource(settings_cls, (toml, env_values), init), env_values, toml)


# --- Checks ------------------------------------------------------------------------


class SecretKind(enum.StrEnum):
    """What a secret is used for, which decides how it is checked."""

    KEY = "key"
    """Keying material (a pepper, an HMAC key): entropy is the whole of its strength."""
    TOKEN = "token"  # noqa: S105 -- the name of a kind, not a secret
    """A bearer token compared by the server (admin, metrics, health)."""
    JWKS = "jwks"
    """A JSON Web Key Set of signing keys; symmetric (``oct``) keys are keying material."""


@dataclass(frozen=True, slots=True)
class SecretRule:
    """How one secret setting is checked."""

    kind: SecretKind
    min_bits: int
    """Least estimated entropy, in bits (for a JWKS: of each ``oct`` key)."""
    required_in: str | None = None
    """Dotted path of the ``enabled`` switch that makes the secret required in
    production (``identity``), or ``None`` when it is optional."""
    generated_in_development: bool = False
    """A missing value is generated in development (else another component copes)."""


SECRET_RULES: Final[Mapping[tuple[str, ...], SecretRule]] = {
    # A pepper is an HMAC key for the password hash: 256 bits, like an HS256 key.
    ("identity", "passwords", "pepper"): SecretRule(
        SecretKind.KEY, 256, required_in="identity", generated_in_development=True
    ),
    # Missing in development: the tokens component generates a key under key_directory.
    ("identity", "tokens", "signing_keys"): SecretRule(
        SecretKind.JWKS, 256, required_in="identity"
    ),
    # Keys the stored hash of every API key, like a pepper does for passwords.
    ("identity", "api_keys", "secret"): SecretRule(
        SecretKind.KEY, 256, required_in="identity", generated_in_development=True
    ),
    ("identity", "api_keys", "previous_secrets"): SecretRule(SecretKind.KEY, 256),
    # Wraps every data subject's audit key: AES-256, so 256 bits. Checkpoint signing
    # keys are signed-note keys, checked and generated by bastion.audit's signing_keys().
    ("audit", "encryption_key"): SecretRule(
        SecretKind.KEY, 256, required_in="audit", generated_in_development=True
    ),
    # Bearer tokens are online guesses against a server: 128 bits is far past reach.
    ("http", "admin_token"): SecretRule(SecretKind.TOKEN, 128),
    ("metrics", "token"): SecretRule(SecretKind.TOKEN, 128),
    ("health", "token"): SecretRule(SecretKind.TOKEN, 128),
}
"""Every checked secret setting, by path in the settings tree."""

NOT_CHECKED: Final[Mapping[tuple[str, ...], str]] = {
    ("tracing", "headers"): "a collector's credentials, chosen by its vendor",
    ("database", "url"): "a DSN: the database server owns its password policy",
    ("redis", "url"): "a DSN: the Redis server owns its password policy",
    ("events", "broker_url"): "a DSN: the broker owns its password policy",
    ("secrets", "openbao_token"): "issued by OpenBao, which owns its form and life",
    ("identity", "mail", "smtp_password"): "the mail server owns its password policy",
    (
        "audit",
        "signing_keys",
    ): "signed-note Ed25519 keys, checked by bastion.audit's signing_keys()",
    ("audit", "maintenance_url"): "a DSN: the database server owns its password policy",
}
"""Secret settings deliberately left unchecked, with why (a test keeps both maps complete)."""

_PLACEHOLDERS: Final = frozenset(
    {
        "changeme",
        "change-me",
        "change_me",
        "secret",
        "password",
        "passw0rd",
        "example",
        "default",
        "test",
        "token",
        "pepper",
        "admin",
        "root",
        "dev",
        "development",
        "qwerty",
        "letmein",
        "123456",
        "12345678",
        "xxx",
        "todo",
        "none",
        "null",
        # The values docs and examples show.
        "your-secret-here",
        "s3cr3t",
        "hunter2",
        "supersecret",
        "super-secret",
        "mysecret",
        "my-secret",
        "probe-token-123",
    }
)
# Words no real secret contains: a random value holds one of these with negligible odds.
_PLACEHOLDER_MARKERS: Final = (
    "changeme",
    "change-me",
    "change_me",
    "replace",
    "placeholder",
    "example",
    "your-",
    "your_",
    "dummy",
    "insecure",
    "secret",
    "password",
)
# A template left unrendered, as a whole value: <pepper>, ${PEPPER}, {{ pepper }}, %PEPPER%.
_TEMPLATE: Final = re.compile(r"<[^<>]*>|\$\{[^}]*\}|\{\{[^}]*\}\}|%[^%]*%")

_HEX: Final = frozenset(string.hexdigits.lower())
_RUN: Final = 5
"""Length from which a run, a ±1 sequence or a repeated block is a pattern, not chance:
5 keeps the odds of a false find in a random 64-character hex key near 0.5%."""


def _alphabet(value: str) -> int:
    characters = set(value)
    if characters <= _HEX or characters <= frozenset(string.hexdigits.upper()):
        return 16
    size = 0
    for group in (string.ascii_lowercase, string.ascii_uppercase, string.digits):
        if characters & set(group):
            size += len(group)
    if characters & set(string.punctuation + " "):
        size += len(string.punctuation) + 1
    if any(ord(c) > 127 for c in characters):  # noqa: PLR2004 -- the end of ASCII
        size += 1000  # generous: non-ASCII letters are rarely random
    return max(size, 1)


def _predictable(value: str) -> int:
    """Positions a pattern explains: runs, ±1 sequences, repeats of an earlier block."""
    codes = [ord(c) for c in value]
    seen: set[str] = set()
    count = 0
    for end in range(_RUN, len(value) + 1):
        steps = {b - a for a, b in itertools.pairwise(codes[end - _RUN : end])}
        block = value[end - _RUN : end]
        if (len(steps) == 1 and steps <= {-1, 0, 1}) or block in seen:
            count += 1
        seen.add(block)
    return count


def estimate_entropy(value: str) -> float:
    """An upper-bound estimate of the entropy of ``value``, in bits.

    Each character not explained by a pattern (a run, a ±1 sequence, a repeat of
    an earlier block of five) counts ``log2`` of the alphabet of the character
    classes the value uses (16 for hex). A value of one repeated character or a
    short word is far under any key's need; a random value is counted at its
    true strength (``secrets.token_urlsafe(32)``: 258 bits).

    Example:
        >>> estimate_entropy("a" * 64)  # four hex characters, then a run
        16.0
    """
    free = len(value) - _predictable(value)
    return free * math.log2(_alphabet(value))


@dataclass(frozen=True, slots=True)
class SecretProblem:
    """One secret that is missing, a placeholder, too weak or malformed. Never carries the value."""

    variable: str
    """The environment variable that sets it (``BASTION_IDENTITY__PASSWORDS__PEPPER``)."""
    problem: str
    """``missing``, ``placeholder``, ``weak`` or ``invalid``."""
    message: str
    """One line for an operator, naming the variable and what it needs."""
    fatal: bool
    """Whether it stops start-up (always in production)."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, for ``bastion secrets check --json``."""
        return {
            "variable": self.variable,
            "problem": self.problem,
            "message": self.message,
            "fatal": self.fatal,
        }


def _variable(path: tuple[str, ...]) -> str:
    return ENV_PREFIX + "__".join(path).upper()


def _lookup(root: Any, path: tuple[str, ...]) -> Any:
    node = root
    for part in path:
        node = getattr(node, part, None)
    return node


def _is_placeholder(value: str) -> bool:
    folded = value.strip().lower()
    return (
        folded in _PLACEHOLDERS
        or any(marker in folded for marker in _PLACEHOLDER_MARKERS)
        or _TEMPLATE.fullmatch(folded) is not None
    )


def _check_value(value: str, rule: SecretRule) -> tuple[str, str] | None:
    """``(problem, what is wrong)`` for a plain secret, or ``None`` when it is fit."""
    if not value.strip():
        return "missing", "is empty"
    if _is_placeholder(value):
        return "placeholder", "is a known placeholder or example value"
    bits = estimate_entropy(value)
    if bits < rule.min_bits:
        return "weak", f"has about {bits:.0f} bits of entropy; {rule.kind} needs {rule.min_bits}"
    return None


def _b64_bytes(text: str) -> bytes:
    # validate=True: without it, characters outside the alphabet are silently dropped.
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def _check_jwks(value: str, rule: SecretRule) -> tuple[str, str] | None:
    try:
        document = json.loads(value)
    except ValueError:
        return "invalid", 'is not JSON (a JWKS: {"keys": [...]})'
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not keys:
        return "invalid", 'is not a JWKS with at least one key ({"keys": [...]})'
    for position, key in enumerate(keys):
        found = _check_jwk(key, position, rule)
        if found is not None:
            return found
    return None


def _check_jwk(key: Any, position: int, rule: SecretRule) -> tuple[str, str] | None:
    if not isinstance(key, dict) or "kty" not in key:
        return "invalid", f"key {position} is not a JSON Web Key"
    name = f"key {key.get('kid', position)!r}"
    if key["kty"] != "oct":
        # Only the first key signs; the ones after it may be public keys that are
        # still trusted during a rotation's overlap (KeySet accepts them so).
        return _check_asymmetric_jwk(key, name, signing=position == 0)
    try:
        material = _b64_bytes(str(key.get("k", "")))
    except ValueError:
        return "invalid", f"{name} has a 'k' that is not base64url"
    # Random bytes are rarely printable; only a key typed as text can be a placeholder.
    if (
        material.isascii()
        and material.decode("ascii").isprintable()
        and _is_placeholder(material.decode("ascii"))
    ):
        return "placeholder", f"{name} is a known placeholder or example value"
    # Eight bits a byte, less the bytes a pattern explains (32 equal bytes are not a key).
    bits = (len(material) - _predictable(material.decode("latin-1"))) * 8
    if bits < rule.min_bits:
        return "weak", f"{name} has about {bits:.0f} bits; an HMAC key needs {rule.min_bits}"
    return None


def _check_asymmetric_jwk(
    key: dict[str, Any], name: str, *, signing: bool
) -> tuple[str, str] | None:
    if signing and "d" not in key:
        return "invalid", f"{name} has no private part ('d'): the first key signs"
    if key["kty"] == "RSA":
        try:
            modulus = _b64_bytes(str(key.get("n", "")))
        except ValueError:
            return "invalid", f"{name} has an 'n' that is not base64url"
        if len(modulus) * 8 < 2048:  # noqa: PLR2004 -- NIST's floor for RSA
            return "weak", f"{name} is an RSA key under 2048 bits"
    return None


def check_secrets(settings: Settings) -> list[SecretProblem]:
    """Check every secret setting against :data:`SECRET_RULES`.

    A missing required secret is reported in production only (in development it
    is generated or another component makes one). Problems are fatal in production.

    Args:
        settings: the effective settings.

    Returns:
        One problem per offending secret, in the order of :data:`SECRET_RULES`.

    Example:
        >>> from bastion.settings import Settings
        >>> [p.problem for p in check_secrets(Settings(health={"token": "changeme"}))]
        ['placeholder']
    """
    production = settings.environment == "production"
    problems: list[SecretProblem] = []
    for path, rule in SECRET_RULES.items():
        variable = _variable(path)
        secret = _lookup(settings, path)
        required = rule.required_in is not None and bool(
            _lookup(settings, (*rule.required_in.split("."), "enabled"))
        )
        if secret is None:
            if required and production:
                message = f"{variable} is required in production"
                problems.append(SecretProblem(variable, "missing", message, fatal=True))
            continue
        checker = _check_jwks if rule.kind is SecretKind.JWKS else _check_value
        # A list (older secrets kept for rotation) is checked entry by entry.
        entries = list(enumerate(secret)) if isinstance(secret, list) else [(None, secret)]
        for index, entry in entries:
            value = entry.get_secret_value() if isinstance(entry, SecretStr) else str(entry)
            found = checker(value, rule)
            if found is not None:
                problem, what = found
                name = variable if index is None else f"{variable}[{index}]"
                problems.append(SecretProblem(name, problem, f"{name} {what}", production))
    return problems


def _development_value(directory: Path, name: str) -> str:
    """A generated secret kept in ``directory``, so every worker and restart share it."""
    path = directory / name
    with contextlib.suppress(FileNotFoundError):
        return path.read_text(encoding="utf-8").strip()
    directory.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(GENERATED_BYTES)
    # Write aside then link: of workers racing at first start, one wins and all read it.
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, encoding="utf-8") as f:
        f.write(value + "\n")
    try:
        os.chmod(f.name, 0o600)
        os.link(f.name, path)
    except FileExistsError:
        value = path.read_text(encoding="utf-8").strip()
    finally:
        os.unlink(f.name)
    return value


def resolve_development_secrets(settings: Settings) -> Settings:
    """Fill each missing secret that development generates, with a warning per secret.

    The value is made once with :func:`secrets.token_urlsafe` (384 bits) and kept
    in ``secrets.development_directory`` (mode 0600), so a restart or another
    worker uses the same pepper and old password hashes keep verifying. In
    production nothing is generated and ``settings`` is returned unchanged.

    Args:
        settings: the effective settings.

    Returns:
        A copy with the generated values set (or ``settings`` itself).
    """
    if settings.environment == "production":
        return settings
    directory = Path(settings.secrets.development_directory)
    for path, rule in SECRET_RULES.items():
        if not rule.generated_in_development or _lookup(settings, path) is not None:
            continue
        if rule.required_in is not None and not _lookup(
            settings, (*rule.required_in.split("."), "enabled")
        ):
            continue
        variable = _variable(path)
        value = _development_value(directory, variable.lower())
        settings = _replace(settings, path, SecretStr(value))
        logger.warning(
            "secret_generated_for_development",
            variable=variable,
            directory=str(directory),
            hint=f"set {variable} (any source) before production",
        )
    return settings


def _replace(model: Any, path: tuple[str, ...], value: Any) -> Any:
    if len(path) == 1:
        return model.model_copy(update={path[0]: value})
    child = getattr(model, path[0])
    return model.model_copy(update={path[0]: _replace(child, path[1:], value)})


def enforce_secrets(settings: Settings) -> Settings:
    """Check the secrets at start-up: fail in production, warn and fill in development.

    Args:
        settings: the effective settings.

    Returns:
        The settings to run with (development may have generated a pepper).

    Raises:
        ConfigurationError: in production, one line per problem, naming variables only.
    """
    problems = check_secrets(settings)
    fatal = [problem.message for problem in problems if problem.fatal]
    if fatal:
        raise ConfigurationError("unsafe secrets:\n" + "\n".join(f"- {m}" for m in fatal))
    for problem in problems:
        logger.warning(
            "secret_unfit",
            variable=problem.variable,
            problem=problem.problem,
            detail=problem.message,
        )
    return resolve_development_secrets(settings)
