"""E-mail senders: the outgoing message, the sender protocol, a logging sender and an SMTP sender.

Identity hands every message it sends (address verification, password reset,
invitation) to one :class:`MailSender`. Two ship with bastion:

* :class:`LoggingSender`, the default for development: nothing leaves the
  process; a log line says that a message of a given purpose went to a given
  domain, and the last messages are kept in memory for tests and local use;
* :class:`SmtpSender`: the standard library's ``smtplib`` in a small thread
  pool of its own, every delivery through the resilience pipeline ``smtp``.

The bodies of these messages carry single-use tokens, and their recipients are
personal data: no log line written here carries an address, a subject, a body
or a link, only the message's purpose and the recipient's domain.

Failures of :meth:`SmtpSender.send`::

    InvalidInput            the message itself is malformed (raised by OutgoingMail)
    MailDeliveryError       502, never retried: the server refused for good (5xx),
                            or a setting is wrong (no STARTTLS, bad certificate)
    DependencyError         502, from the pipeline: 4xx answers or lost connections
                            on every attempt the ``smtp`` policy allows
    DependencyTimeoutError  503, from the pipeline: no answer in time
    CircuitOpenError        503, from the pipeline: the ``smtp`` circuit is open
"""

from __future__ import annotations

import asyncio
import email.policy
import ipaddress
import re
import smtplib
import socket
import ssl
import string
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from types import MappingProxyType, TracebackType
from typing import Final, Literal, Protocol, Self, runtime_checkable
from urllib.parse import urlsplit

import structlog
from pydantic import SecretStr

from bastion.errors import ConfigurationError, DependencyFailure, FieldError, InvalidInput
from bastion.observability.metrics import IDENTITY_MAIL_MESSAGES
from bastion.resilience import DependencyError, Pipeline, current_resilience, default_policy

__all__ = [
    "DEFAULT_KEEP",
    "DEFAULT_SMTP_TIMEOUT",
    "INVITATION_TEMPLATE",
    "PASSWORD_RESET_TEMPLATE",
    "SMTP_PIPELINE",
    "VERIFICATION_TEMPLATE",
    "LoggingSender",
    "MailDeliveryError",
    "MailSender",
    "MailTemplate",
    "OutgoingMail",
    "SmtpSecurity",
    "SmtpSender",
]

logger = structlog.get_logger("bastion.identity.mail")

SMTP_PIPELINE: Final = "smtp"
"""The resilience pipeline every SMTP delivery goes through (``resilience.dependencies.smtp``)."""
DEFAULT_KEEP: Final = 100
"""How many messages a :class:`LoggingSender` keeps in memory by default."""
DEFAULT_SMTP_TIMEOUT: Final = 10.0
"""Seconds each blocking SMTP operation (connect, one command) may take."""
DEFAULT_MAX_CONNECTIONS: Final = 4

SmtpSecurity = Literal["starttls", "tls", "none"]
_DEFAULT_PORTS: Final[Mapping[str, int]] = {"starttls": 587, "tls": 465, "none": 25}

# RFC 5321 limits: 64 octets of local part, 254 of path (256 less the brackets).
_MAX_LOCAL: Final = 64
_MAX_ADDRESS: Final = 254
_MAX_SUBJECT: Final = 255
_MAX_HEADER_VALUE: Final = 998
_MAX_BODY: Final = 1_000_000
_MAX_LINK: Final = 2048
# A dot in the domain: "ada@localhost" is not an address mail from a service can reach.
_MIN_LABELS: Final = 2
# Dot-atom local parts only: quoted local parts ("a b"@x) are legal but no
# sign-up form needs them, and they are where parsers disagree.
_LOCAL: Final = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_LABEL: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_HEADER_NAME: Final = re.compile(r"[!-9;-~]{1,76}")  # printable ASCII but the colon
_PURPOSE: Final = re.compile(r"[a-z0-9_.-]{1,40}")  # a metric label and a log field
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
# The sender writes these itself; a caller's copy would add recipients, hide the
# origin or break the MIME structure.
_RESERVED_HEADERS: Final = frozenset(
    {
        "bcc",
        "cc",
        "content-disposition",
        "content-transfer-encoding",
        "content-type",
        "date",
        "from",
        "message-id",
        "mime-version",
        "received",
        "return-path",
        "sender",
        "subject",
        "to",
    }
)
# Never 8bit on the wire: a server without 8BITMIME gets the same bytes as any other.
_POLICY: Final = email.policy.SMTP.clone(cte_type="7bit")


def _field_error(errors: list[FieldError], name: str, code: str, message: str) -> None:
    errors.append(FieldError(field=name, code=code, message=message))


def _normalize_address(value: object, name: str, errors: list[FieldError]) -> str:
    """Return ``value`` as an ASCII ``local@domain`` (the domain lower-cased, IDNA-encoded).

    The messages never echo the address: it is personal data.
    """
    if not isinstance(value, str) or not value:
        _field_error(errors, name, "missing", "An e-mail address is required.")
        return ""
    local, at, domain = value.rpartition("@")
    if not at or _LOCAL.fullmatch(local) is None or len(local) > _MAX_LOCAL:
        _field_error(errors, name, "invalid_address", "The e-mail address is not valid.")
        return ""
    try:
        # A non-ASCII domain goes on the wire as its punycode form; a non-ASCII
        # local part would need SMTPUTF8, which is refused above.
        ascii_domain = domain.encode("idna").decode("ascii").lower()
    except UnicodeError:
        ascii_domain = ""
    labels = ascii_domain.split(".")
    if len(labels) < _MIN_LABELS or not all(_LABEL.fullmatch(label) for label in labels):
        _field_error(errors, name, "invalid_address", "The e-mail address is not valid.")
        return ""
    address = f"{local}@{ascii_domain}"
    if len(address) > _MAX_ADDRESS:
        _field_error(errors, name, "too_long", "The e-mail address is too long.")
        return ""
    return address


def _check_line(value: object, name: str, limit: int, errors: list[FieldError]) -> None:
    """One header line's value: a string, no line break nor other control character."""
    if not isinstance(value, str):
        _field_error(errors, name, "invalid", "A header value must be a string.")
    elif _CONTROL.search(value.replace("\t", " ")):
        # CR or LF in a header value would start a header of the caller's choosing.
        _field_error(
            errors, name, "line_break", "A header value may not contain line breaks or controls."
        )
    elif len(value) > limit:
        _field_error(errors, name, "too_long", f"At most {limit} characters.")


@dataclass(frozen=True, slots=True)
class OutgoingMail:
    """One e-mail message to hand to a :class:`MailSender`; validated when made.

    The sender adds ``From``, ``Date``, ``Message-ID`` and the MIME headers; the
    message may not set those, nor ``Cc``/``Bcc`` (one recipient per message).

    Args:
        to: the recipient's address, ``local@domain``; a non-ASCII domain is
            IDNA-encoded, a non-ASCII local part refused (no SMTPUTF8).
        subject: one line, at most 255 characters.
        text: the plain-text body (always sent).
        purpose: what the message is for (``verification``, ``password_reset``,
            ``invitation``...): lower-case letters, digits and ``_.-``; it is a
            log field and a metric label.
        html: an optional HTML alternative to ``text``.
        headers: extra headers (``Reply-To``, ``List-Unsubscribe``, ``X-*``).

    Raises:
        InvalidInput: one :class:`~bastion.errors.FieldError` per problem: an
            invalid address, a line break or control character in the subject or
            in any header (header injection), a reserved or malformed header
            name, an empty or oversized body. No message echoes the address.

    Example:
        >>> OutgoingMail(to="ada@example.com", subject="Hello", text="Hi!", purpose="greeting")
    """

    to: str
    subject: str
    text: str
    purpose: str = "message"
    html: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        errors: list[FieldError] = []
        to = _normalize_address(self.to, "to", errors)
        _check_line(self.subject, "subject", _MAX_SUBJECT, errors)
        if isinstance(self.subject, str) and not self.subject.strip():
            _field_error(errors, "subject", "missing", "A subject is required.")
        if not isinstance(self.purpose, str) or _PURPOSE.fullmatch(self.purpose) is None:
            _field_error(
                errors, "purpose", "invalid", "1 to 40 of lower-case letters, digits and '_.-'."
            )
        for name, body in (("text", self.text), ("html", self.html)):
            if body is None and name == "html":
                continue
            if not isinstance(body, str) or not body.strip():
                _field_error(errors, name, "missing", "A body is required.")
            elif len(body) > _MAX_BODY:
                _field_error(errors, name, "too_long", f"At most {_MAX_BODY} characters.")
        headers = dict(self.headers) if isinstance(self.headers, Mapping) else {}
        for key, value in headers.items():
            if not isinstance(key, str) or _HEADER_NAME.fullmatch(key) is None:
                _field_error(errors, "headers", "invalid_name", "Not a valid header name.")
                continue
            if key.lower() in _RESERVED_HEADERS:
                _field_error(
                    errors, f"headers.{key}", "reserved", "The sender sets this header itself."
                )
                continue
            _check_line(value, f"headers.{key}", _MAX_HEADER_VALUE, errors)
        if errors:
            raise InvalidInput("The e-mail message is not valid.", errors=errors)
        object.__setattr__(self, "to", to)
        object.__setattr__(self, "headers", MappingProxyType(headers))

    @property
    def recipient_domain(self) -> str:
        """The recipient's domain: what log lines say about the recipient, never more."""
        return self.to.rpartition("@")[2]

    def __repr__(self) -> str:
        # The default repr would print the address and the body (and its token)
        # into any traceback or debug log that shows this object.
        return f"OutgoingMail(purpose={self.purpose!r}, to=<…@{self.recipient_domain}>)"


@runtime_checkable
class MailSender(Protocol):
    """Where identity hands the e-mail it sends; implement it for another transport.

    ``send`` returns once the message is accepted for delivery (or raises); it
    must not log the address, the subject or the body.
    """

    async def send(self, message: OutgoingMail) -> None:
        """Send ``message``, or raise."""
        ...


class LoggingSender:
    """The development sender: logs that a message was sent and keeps it in memory; sends nothing.

    Each message writes one info line, ``mail logged, not sent``, with its
    ``purpose`` and ``recipient_domain`` only: never the address, the subject,
    the body or the link, which carries a token. The last ``keep`` messages are
    held in this process's memory, so a test or a developer can read the link
    (:meth:`last`). They are lost on restart and not shared between workers;
    in production use a real sender (or ``keep=0``).

    Args:
        keep: how many of the latest messages to keep; 0 keeps none.

    Raises:
        ValueError: ``keep`` is negative.

    Example:
        >>> sender = LoggingSender()
        >>> await sender.send(VERIFICATION_TEMPLATE.render("ada@example.com", link=url,
        ...     expires_in=86400, service="Docs"))
        >>> sender.last(purpose="verification").text
    """

    def __init__(self, *, keep: int = DEFAULT_KEEP) -> None:
        if keep < 0:
            raise ValueError("keep must be 0 or more")
        self._messages: deque[OutgoingMail] = deque(maxlen=keep)

    @property
    def messages(self) -> tuple[OutgoingMail, ...]:
        """The messages kept, oldest first."""
        return tuple(self._messages)

    def last(self, *, purpose: str | None = None, to: str | None = None) -> OutgoingMail:
        """Return the latest kept message, of ``purpose`` and to ``to`` when given.

        Raises:
            LookupError: no kept message matches.
        """
        wanted = None if to is None else to.lower()
        for message in reversed(self._messages):
            if purpose is not None and message.purpose != purpose:
                continue
            if wanted is not None and message.to.lower() != wanted:
                continue
            return message
        raise LookupError("no kept message matches")

    def clear(self) -> None:
        """Forget every kept message."""
        self._messages.clear()

    async def send(self, message: OutgoingMail) -> None:
        """Keep ``message`` and log that it was sent (purpose and recipient's domain only)."""
        if self._messages.maxlen:
            self._messages.append(message)
        IDENTITY_MAIL_MESSAGES.labels(message.purpose, "logged").inc()
        logger.info(
            "mail logged, not sent",
            purpose=message.purpose,
            recipient_domain=message.recipient_domain,
        )

    async def ping(self) -> None:
        """Always ready."""


class MailDeliveryError(DependencyFailure):
    """The mail server refused the message for good, or the sender is misconfigured (502).

    Never retried. The server's own text (which often repeats the address) is
    only on ``__cause__``, never in ``detail`` nor in a log line.

    Attributes:
        reason: ``recipient_refused``, ``sender_refused``, ``message_refused``,
            ``authentication_failed``, ``refused`` (another 5xx),
            ``unsupported`` (no STARTTLS or AUTH offered), ``certificate`` (the
            server's certificate failed verification) or ``protocol``.
        smtp_code: the server's reply code, when it gave one.
    """

    def __init__(self, reason: str, smtp_code: int | None = None) -> None:
        super().__init__("The mail server did not accept the message.")
        self.reason = reason
        self.smtp_code = smtp_code
        self.dependency = SMTP_PIPELINE


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


# The final (5xx) answers smtplib raises as their own classes, most specific first.
_REASONS: Final[tuple[tuple[type[smtplib.SMTPResponseException], str], ...]] = (
    (smtplib.SMTPAuthenticationError, "authentication_failed"),
    (smtplib.SMTPSenderRefused, "sender_refused"),
    (smtplib.SMTPDataError, "message_refused"),
)


def _permanent(exc: smtplib.SMTPException) -> MailDeliveryError | None:
    """The permanent failure ``exc`` stands for; ``None`` when another attempt may succeed.

    ``smtplib``'s errors are all ``OSError``s, which the pipeline counts as
    transient; this is where a 5xx answer is told apart from a 4xx one.
    """
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        permanent = [code for code in codes if _final(code)]
        return MailDeliveryError("recipient_refused", permanent[0]) if permanent else None
    if isinstance(exc, smtplib.SMTPResponseException):
        # 4xx, or a reply that is no reply (-1): try again.
        if not _final(exc.smtp_code):
            return None
        reason = next((name for kind, name in _REASONS if isinstance(exc, kind)), "refused")
        return MailDeliveryError(reason, exc.smtp_code)
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return None
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return MailDeliveryError("unsupported")
    # The bare SMTPException smtplib raises for "no suitable authentication method".
    return MailDeliveryError("protocol")


def _final(code: int) -> bool:
    """Whether an SMTP reply code is a permanent negative completion (5xx)."""
    return 500 <= code < 600  # noqa: PLR2004 -- the SMTP reply classes


class SmtpSender:
    """Send through an SMTP server (submission with STARTTLS, implicit TLS, or plain on loopback).

    Each message opens one connection: EHLO, STARTTLS when asked, login when a
    username is given, one recipient, QUIT. ``smtplib`` runs in a thread pool of
    this sender's own (``max_connections`` threads), so a slow server can hold
    at most that many threads and never the event loop's default pool.

    Every delivery goes through the resilience pipeline ``smtp`` (its policy
    under ``resilience.dependencies.smtp``; the current registry's when bastion
    is installed, else one of this sender's own with the ``custom`` defaults).
    4xx answers and lost or refused connections are transient: retried, counted
    against the circuit. 5xx answers are final: :class:`MailDeliveryError`, not
    retried, not counted. Retrying repeats a whole delivery: when a connection
    drops after the server took the message but before it said so, the
    recipient may get it twice, which beats not getting it at all.

    ``timeout`` bounds each blocking operation of the thread, so a thread whose
    call the pipeline has given up on ends within it too.

    Args:
        host: the server's host name or address.
        port: default 587 for ``starttls``, 465 for ``tls``, 25 for ``none``.
        from_address: the envelope sender and ``From`` address.
        from_name: an optional display name for ``From``.
        security: ``starttls`` (the default; refused if the server does not offer
            it), ``tls`` (implicit TLS), or ``none`` (plain text).
        username: log in as this user after the TLS handshake.
        password: the password for ``username``.
        timeout: seconds (or a ``timedelta``) for the connect and each command.
        ssl_context: for a private CA; the default verifies against the system's.
        local_hostname: the EHLO name; default this machine's FQDN (looked up once).
        max_connections: how many deliveries may run at once.
        pipeline: the pipeline to send through; default as above.

    Raises:
        ConfigurationError: an empty host, a port out of range, a timeout or
            ``max_connections`` not positive, an invalid ``from_address``, a
            username without a password (or the reverse), or a login over a
            plain-text connection to a host that is not the loopback.

    Example:
        >>> sender = SmtpSender("smtp.example.com", from_address="no-reply@example.com",
        ...     username="bastion", password=SecretStr(os.environ["SMTP_PASSWORD"]))
        >>> await sender.send(message)
    """

    def __init__(
        self,
        host: str,
        port: int | None = None,
        *,
        from_address: str,
        from_name: str | None = None,
        security: SmtpSecurity = "starttls",
        username: str | None = None,
        password: SecretStr | str | None = None,
        timeout: float | timedelta = DEFAULT_SMTP_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        local_hostname: str | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        pipeline: Pipeline | None = None,
    ) -> None:
        problems: list[str] = []
        if not host:
            problems.append("host is empty")
        if security not in _DEFAULT_PORTS:
            problems.append(f"security must be one of {sorted(_DEFAULT_PORTS)}")
        port = port if port is not None else _DEFAULT_PORTS.get(security, 25)
        if not 0 < port < 65536:  # noqa: PLR2004 -- the TCP port range
            problems.append("port must be 1 to 65535")
        seconds = _seconds(timeout)
        if seconds <= 0:
            problems.append("timeout must be positive")
        if max_connections < 1:
            problems.append("max_connections must be 1 or more")
        errors: list[FieldError] = []
        sender = _normalize_address(from_address, "from_address", errors)
        if errors:
            problems.append("from_address is not a valid e-mail address")
        if from_name is not None and _CONTROL.search(from_name):
            problems.append("from_name may not contain line breaks or controls")
        secret = password.get_secret_value() if isinstance(password, SecretStr) else password
        if bool(username) != bool(secret):
            problems.append("username and password go together")
        if username and security == "none" and not _is_loopback(host):
            problems.append("refusing to send a password over plain text; use starttls or tls")
        if problems:
            raise ConfigurationError("identity mail (smtp): " + "; ".join(problems))
        self.host = host
        self.port = port
        self.security: SmtpSecurity = security
        self.from_address = sender
        self.from_name = from_name
        self.timeout = seconds
        self._username = username or None
        self._password = SecretStr(secret) if secret else None
        self._ssl_context = ssl_context
        self._local_hostname = local_hostname
        self._max_connections = max_connections
        self._pipeline = pipeline
        self._own_pipeline: Pipeline | None = None
        self._executor: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"SmtpSender({self.host!r}, {self.port}, security={self.security!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the sender's threads; deliveries in progress finish within ``timeout``."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    async def send(self, message: OutgoingMail) -> None:
        """Deliver ``message`` to the server, through the ``smtp`` pipeline.

        Raises:
            MailDeliveryError: a 5xx answer or a wrong setting; not retried (502).
            DependencyError: transient failures on every attempt allowed (502).
            DependencyTimeoutError: the server did not answer in time (503).
            CircuitOpenError: the ``smtp`` circuit is open (503).
            BulkheadFullError: the pipeline's bulkhead is full (503).
        """
        composed = self._compose(message)
        started = time.perf_counter()
        try:
            await self._pipeline_now().call(self._attempt, composed, message.to)
        except MailDeliveryError as exc:
            IDENTITY_MAIL_MESSAGES.labels(message.purpose, "rejected").inc()
            logger.warning(
                "mail refused",
                purpose=message.purpose,
                recipient_domain=message.recipient_domain,
                reason=exc.reason,
                smtp_code=exc.smtp_code,
            )
            raise
        except BaseException as exc:
            # The pipeline's own failures (502/503), or a cancellation: the
            # pipeline has logged the dependency failure; count it here.
            if isinstance(exc, Exception):
                IDENTITY_MAIL_MESSAGES.labels(message.purpose, "failed").inc()
            raise
        IDENTITY_MAIL_MESSAGES.labels(message.purpose, "sent").inc()
        logger.info(
            "mail sent",
            purpose=message.purpose,
            recipient_domain=message.recipient_domain,
            message_id=composed["Message-ID"],
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )

    async def ping(self) -> None:
        """Connect, greet (and start TLS and log in, when configured), then quit; no retry.

        Raises:
            MailDeliveryError: a permanent answer or a wrong setting.
            DependencyError: the server cannot be reached or did not answer in time.
        """
        try:
            await self._in_thread(self._noop)
        except smtplib.SMTPException as exc:
            permanent = _permanent(exc)
            if permanent is not None:
                raise permanent from exc
            raise DependencyError(SMTP_PIPELINE) from exc
        except ssl.SSLCertVerificationError as exc:
            raise MailDeliveryError("certificate") from exc
        except OSError as exc:
            raise DependencyError(SMTP_PIPELINE) from exc

    # -- internals -----------------------------------------------------------

    def _pipeline_now(self) -> Pipeline:
        if self._pipeline is not None:
            return self._pipeline
        try:
            return current_resilience().pipeline(SMTP_PIPELINE)
        except RuntimeError:
            # Outside an installed app (a script, a test): a pipeline of our own,
            # with the defaults and no shared circuit.
            if self._own_pipeline is None:
                self._own_pipeline = Pipeline(
                    SMTP_PIPELINE, default_policy(SMTP_PIPELINE, "custom"), breaker=None
                )
            return self._own_pipeline

    def _compose(self, message: OutgoingMail) -> EmailMessage:
        composed = EmailMessage(policy=_POLICY)
        local, _, domain = self.from_address.partition("@")
        composed["From"] = Address(display_name=self.from_name or "", username=local, domain=domain)
        composed["To"] = message.to
        composed["Subject"] = message.subject
        composed["Date"] = formatdate(usegmt=True)
        # The sender's domain, not socket.getfqdn(): that is a DNS lookup per message.
        composed["Message-ID"] = make_msgid(domain=domain)
        for name, value in message.headers.items():
            composed[name] = value
        composed.set_content(message.text)
        if message.html is not None:
            composed.add_alternative(message.html, subtype="html")
        return composed

    async def _attempt(self, composed: EmailMessage, to: str) -> None:
        """One delivery; a permanent failure leaves as MailDeliveryError, which is not retried."""
        try:
            await self._in_thread(self._deliver, composed, to)
        except smtplib.SMTPServerDisconnected as exc:
            if isinstance(exc.__context__, TimeoutError):
                # smtplib reports a reply that timed out as a lost connection;
                # the pipeline should see (and report, 503) a timeout.
                raise TimeoutError("the mail server did not answer in time") from exc
            raise
        except smtplib.SMTPException as exc:
            permanent = _permanent(exc)
            if permanent is not None:
                raise permanent from exc
            raise
        except ssl.SSLCertVerificationError as exc:
            raise MailDeliveryError("certificate") from exc

    async def _in_thread(self, fn: Callable[..., None], /, *args: object) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                self._max_connections, thread_name_prefix="bastion-smtp"
            )
        await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _connect(self) -> smtplib.SMTP:
        if self._local_hostname is None:
            # smtplib would look the FQDN up (a DNS query) on every connection: once is enough.
            self._local_hostname = socket.getfqdn()
        context = self._ssl_context
        if context is None and self.security != "none":
            # Loading the system's CA bundle takes milliseconds: once per sender.
            context = self._ssl_context = ssl.create_default_context()
        client: smtplib.SMTP
        if self.security == "tls":
            client = smtplib.SMTP_SSL(
                self.host,
                self.port,
                local_hostname=self._local_hostname,
                timeout=self.timeout,
                context=context,
            )
        else:
            client = smtplib.SMTP(
                self.host, self.port, local_hostname=self._local_hostname, timeout=self.timeout
            )
        try:
            client.ehlo()
            if self.security == "starttls":
                # smtplib raises SMTPNotSupportedError when the server does not
                # offer it: never fall back to plain text.
                client.starttls(context=context)
                client.ehlo()
            if self._username and self._password is not None:
                client.login(self._username, self._password.get_secret_value())
        except BaseException:
            client.close()
            raise
        return client

    def _deliver(self, composed: EmailMessage, to: str) -> None:
        client = self._connect()
        try:
            client.send_message(composed, from_addr=self.from_address, to_addrs=[to])
        finally:
            _quit(client)

    def _noop(self) -> None:
        client = self._connect()
        try:
            code, _ = client.noop()
            if code != 250:  # noqa: PLR2004 -- SMTP OK
                raise smtplib.SMTPResponseException(code, b"NOOP")
        finally:
            _quit(client)


def _quit(client: smtplib.SMTP) -> None:
    # The message was accepted before QUIT: a failing QUIT must not fail the
    # delivery (and get it retried, so sent twice). smtplib's own __exit__ raises there.
    try:
        client.quit()
    except (smtplib.SMTPException, OSError):
        client.close()


def _duration_text(seconds: float) -> str:
    """``expires_in`` in words: the largest unit that divides it, else minutes."""
    whole = max(0, round(seconds))
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if whole >= size and whole % size == 0:
            count = whole // size
            return f"{count} {unit}{'' if count == 1 else 's'}"
    minutes = max(1, round(whole / 60))
    return f"{minutes} minute{'' if minutes == 1 else 's'}"


def _check_link(link: str) -> None:
    parts = urlsplit(link) if isinstance(link, str) else None
    if (
        parts is None
        or parts.scheme not in {"https", "http"}
        or not parts.netloc
        or len(link) > _MAX_LINK
        or any(char.isspace() for char in link)
        or _CONTROL.search(link)
    ):
        raise ValueError("link must be an absolute http(s) URL without spaces or controls")


def _one_line(value: object) -> str:
    return " ".join(_CONTROL.sub(" ", str(value)).split())


@dataclass(frozen=True, slots=True)
class MailTemplate:
    """A plain-text message with a link: ``string.Template`` placeholders in subject and text.

    Placeholders are ``$name``; ``$link`` and ``$expires_in`` (in words) are
    always available, the others come from :meth:`render`'s keyword arguments.
    ``string.Template`` rather than ``str.format``: a value can never reach an
    attribute or an index. Values placed in the subject have their whitespace
    and control characters collapsed to single spaces, so a tenant name cannot
    add a header line.

    Example:
        >>> VERIFICATION_TEMPLATE.render("ada@example.com", link=url, expires_in=86400,
        ...     service="Bastion Docs")
    """

    purpose: str
    subject: str
    text: str

    def render(
        self, to: str, *, link: str, expires_in: float | timedelta, **values: str
    ) -> OutgoingMail:
        """Return the message for ``to``.

        Args:
            to: the recipient's address.
            link: the absolute ``https`` (or ``http``) URL carrying the token.
            expires_in: seconds (or a ``timedelta``) until the link expires.
            **values: the template's other placeholders (``service``, ``tenant``).

        Raises:
            ValueError: a placeholder has no value, or ``link`` is not an
                absolute http(s) URL.
            InvalidInput: the message is not valid (see :class:`OutgoingMail`).
        """
        _check_link(link)
        body_values = {**values, "link": link, "expires_in": _duration_text(_seconds(expires_in))}
        subject_values = {
            key: " ".join(_CONTROL.sub(" ", str(v)).split()) for key, v in body_values.items()
        }
        try:
            subject = string.Template(self.subject).substitute(subject_values)
            text = string.Template(self.text).substitute(body_values)
        except KeyError as exc:
            raise ValueError(
                f"template {self.purpose!r} needs a value for {exc.args[0]!r}"
            ) from None
        return OutgoingMail(to=to, subject=subject, text=text, purpose=self.purpose)


VERIFICATION_TEMPLATE: Final = MailTemplate(
    purpose="verification",
    subject="Confirm your e-mail address for $service",
    text=(
        "Hello,\n\n"
        "To confirm this e-mail address for your $service account, open this link:\n\n"
        "$link\n\n"
        "The link works once and expires in $expires_in.\n\n"
        "If you did not sign up for $service, ignore this message: no account is "
        "activated without it.\n"
    ),
)
"""Address verification after sign-up; placeholders ``service``, ``link``, ``expires_in``."""

PASSWORD_RESET_TEMPLATE: Final = MailTemplate(
    purpose="password_reset",
    subject="Reset your $service password",
    text=(
        "Hello,\n\n"
        "Someone asked to reset the password of your $service account. To choose a "
        "new password, open this link:\n\n"
        "$link\n\n"
        "The link works once and expires in $expires_in.\n\n"
        "If you did not ask for this, ignore this message: your password stays as it is.\n"
    ),
)
"""Password reset; placeholders ``service``, ``link``, ``expires_in``."""

INVITATION_TEMPLATE: Final = MailTemplate(
    purpose="invitation",
    subject="You are invited to join $tenant on $service",
    text=(
        "Hello,\n\n"
        "You are invited to join $tenant on $service. To accept, open this link:\n\n"
        "$link\n\n"
        "The link works once and expires in $expires_in.\n\n"
        "If you did not expect this invitation, ignore this message.\n"
    ),
)
"""Tenant invitation; placeholders ``service``, ``tenant``, ``link``, ``expires_in``."""
