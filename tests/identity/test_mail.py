"""E-mail: the outgoing message, the logging sender, the SMTP sender against a real local server."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import email
import email.policy
import ipaddress
import smtplib
import socket
import ssl
import time
from email.message import EmailMessage

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from prometheus_client import REGISTRY
from pydantic import SecretStr
from structlog.testing import capture_logs

from bastion.errors import ConfigurationError, DependencyFailure, InvalidInput
from bastion.identity._mail import (
    INVITATION_TEMPLATE,
    PASSWORD_RESET_TEMPLATE,
    SMTP_PIPELINE,
    VERIFICATION_TEMPLATE,
    LoggingSender,
    MailDeliveryError,
    MailSender,
    OutgoingMail,
    SmtpSender,
    _permanent,
)
from bastion.resilience import (
    DependencyError,
    DependencyTimeoutError,
    Pipeline,
    Resilience,
    default_policy,
    use_resilience,
)
from bastion.settings import ResilienceSettings

ADDRESS = "ada.lovelace@example.com"
LINK = "https://docs.example.com/v1/auth/verify-email?token=tok_SECRET123"


def free_port() -> int:
    """A TCP port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Recorder:
    """An aiosmtpd handler that keeps what arrives and answers with queued replies first."""

    def __init__(self) -> None:
        self.envelopes: list = []
        self.data_calls = 0
        self.rcpt_replies: list[str] = []
        self.data_replies: list[str] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if self.rcpt_replies:
            return self.rcpt_replies.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        self.data_calls += 1
        if self.data_replies:
            return self.data_replies.pop(0)
        self.envelopes.append(envelope)
        return "250 Message accepted for delivery"

    def message(self, index: int = -1) -> EmailMessage:
        parsed = email.message_from_bytes(
            self.envelopes[index].content, policy=email.policy.default
        )
        assert isinstance(parsed, EmailMessage)
        return parsed


def _start(handler: Recorder, **kwargs) -> Controller:
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(), **kwargs)
    controller.start()
    return controller


@pytest.fixture
def smtp_server():
    """A real aiosmtpd server on a free loopback port, plain text."""
    handler = Recorder()
    controller = _start(handler)
    yield handler, controller.port
    controller.stop()


async def _no_sleep(seconds: float) -> None:
    """Backoff waits in tests take no real time."""


def smtp_pipeline(**changes) -> Pipeline:
    """The ``smtp`` pipeline: default policy under ``changes``, no breaker, no real sleeping."""
    policy = dataclasses.replace(default_policy(SMTP_PIPELINE, "custom"), **changes)
    return Pipeline(SMTP_PIPELINE, policy, breaker=None, sleep=_no_sleep)


def plain_sender(port: int, **kwargs) -> SmtpSender:
    kwargs.setdefault("pipeline", smtp_pipeline())
    return SmtpSender(
        "127.0.0.1",
        port,
        from_address="no-reply@docs.example.com",
        from_name="Bastion Docs",
        security="none",
        timeout=5,
        local_hostname="bastion.test",
        **kwargs,
    )


def verification(to: str = ADDRESS) -> OutgoingMail:
    return VERIFICATION_TEMPLATE.render(to, link=LINK, expires_in=86400, service="Bastion Docs")


def mail_count(purpose: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "bastion_identity_mail_messages_total", {"purpose": purpose, "outcome": outcome}
    )
    return value or 0.0


class TestOutgoingMail:
    def test_valid_message_is_normalized(self):
        """The domain is lower-cased and IDNA-encoded; the local part is kept as written."""
        message = OutgoingMail(to="Ada@Bücher.Example", subject="Hi", text="Hello", purpose="x")
        assert "Ada@xn--bcher-kva.example" == message.to
        assert "xn--bcher-kva.example" == message.recipient_domain

    @pytest.mark.parametrize(
        "address",
        [
            "",
            "no-at-sign",
            "a@localhost",
            "a b@example.com",
            "a@exa mple.com",
            "<a@example.com>",
            "Ada <a@example.com>",
            "a@example.com\r\nRCPT TO:<b@evil.example>",
            "a@example.com,b@example.com",
            "ünïcode@example.com",
            "a..b@example.com",
            "a@-example.com",
            ("x" * 65) + "@example.com",
        ],
    )
    def test_invalid_address_is_refused_without_echoing_it(self, address):
        """An address that is not a plain local@domain is refused; the error never repeats it."""
        with pytest.raises(InvalidInput) as caught:
            OutgoingMail(to=address, subject="Hi", text="Hello")
        assert ["to"] == [error.field for error in caught.value.errors]
        assert address not in str(caught.value.problem(None)) or address == ""

    @pytest.mark.parametrize(
        "subject", ["Hi\r\nBcc: eve@evil.example", "Hi\nX: y", "Hi\rX", "a\x00"]
    )
    def test_line_break_in_subject_is_refused(self, subject):
        """CR, LF or another control character in the subject is header injection: refused."""
        with pytest.raises(InvalidInput) as caught:
            OutgoingMail(to=ADDRESS, subject=subject, text="Hello")
        assert [("subject", "line_break")] == [(e.field, e.code) for e in caught.value.errors]

    def test_line_break_in_header_value_is_refused(self):
        """A line break in an extra header's value is refused."""
        with pytest.raises(InvalidInput) as caught:
            OutgoingMail(
                to=ADDRESS,
                subject="Hi",
                text="Hello",
                headers={"Reply-To": "help@example.com\r\nBcc: eve@evil.example"},
            )
        assert [("headers.Reply-To", "line_break")] == [
            (e.field, e.code) for e in caught.value.errors
        ]

    @pytest.mark.parametrize("name", ["Bcc", "cc", "FROM", "Content-Type", "Message-ID"])
    def test_reserved_header_is_refused(self, name):
        """Headers the sender writes itself (or that add recipients) cannot be set."""
        with pytest.raises(InvalidInput) as caught:
            OutgoingMail(to=ADDRESS, subject="Hi", text="Hello", headers={name: "x"})
        assert ["reserved"] == [e.code for e in caught.value.errors]

    @pytest.mark.parametrize("name", ["X-Bad:Name", "X Bad", "X-\r\nBcc", ""])
    def test_malformed_header_name_is_refused(self, name):
        """A header name with a colon, a space or a control character is refused."""
        with pytest.raises(InvalidInput) as caught:
            OutgoingMail(to=ADDRESS, subject="Hi", text="Hello", headers={name: "x"})
        assert ["invalid_name"] == [e.code for e in caught.value.errors]

    @pytest.mark.parametrize(
        ("kwargs", "field", "code"),
        [
            ({"to": ("x" * 64) + "@" + ".".join(["d" * 60] * 4) + ".com"}, "to", "too_long"),
            ({"to": "a@" + ("x" * 70) + ".com"}, "to", "invalid_address"),
            ({"subject": "x" * 256}, "subject", "too_long"),
            ({"text": "x" * 1_000_001}, "text", "too_long"),
            ({"html": " "}, "html", "missing"),
            ({"headers": {"X-Count": 3}}, "headers.X-Count", "invalid"),
            ({"headers": {"X-Long": "x" * 999}}, "headers.X-Long", "too_long"),
        ],
    )
    def test_limits(self, kwargs, field, code):
        """Oversized addresses, subjects, bodies and header values are refused by field."""
        arguments = {"to": ADDRESS, "subject": "Hi", "text": "Hello", **kwargs}
        with pytest.raises(InvalidInput) as caught:
            OutgoingMail(**arguments)
        assert [(field, code)] == [(e.field, e.code) for e in caught.value.errors]

    def test_every_problem_is_reported_at_once(self):
        """Empty body, bad purpose and empty subject are reported together."""
        with pytest.raises(InvalidInput) as caught:
            OutgoingMail(to=ADDRESS, subject=" ", text="", purpose="Not Valid")
        assert {"subject", "text", "purpose"} == {e.field for e in caught.value.errors}

    def test_repr_hides_address_and_body(self):
        """The repr shows the purpose and the domain only."""
        message = verification()
        assert "ada.lovelace" not in repr(message)
        assert "tok_SECRET123" not in repr(message)
        assert "example.com" in repr(message)

    def test_headers_cannot_be_changed_after_validation(self):
        """The extra headers are read-only once the message is made."""
        message = OutgoingMail(to=ADDRESS, subject="Hi", text="Hello", headers={"X-A": "1"})
        with pytest.raises(TypeError):
            message.headers["Bcc"] = "eve@evil.example"  # type: ignore[index]


class TestTemplates:
    def test_verification_carries_link_and_expiry(self):
        """The verification template puts the link and the expiry in words in the text."""
        message = verification()
        assert "verification" == message.purpose
        assert "Confirm your e-mail address for Bastion Docs" == message.subject
        assert LINK in message.text
        assert "expires in 1 day." in message.text

    @pytest.mark.parametrize(
        ("expires_in", "words"),
        [
            (dt.timedelta(hours=1), "1 hour"),
            (7200, "2 hours"),
            (1800, "30 minutes"),
            (90, "2 minutes"),
            (3 * 86400, "3 days"),
        ],
    )
    def test_expiry_in_words(self, expires_in, words):
        """Durations are written in the largest unit that divides them, else minutes."""
        message = PASSWORD_RESET_TEMPLATE.render(
            ADDRESS, link=LINK, expires_in=expires_in, service="Docs"
        )
        assert f"expires in {words}." in message.text

    def test_subject_values_cannot_add_header_lines(self):
        """A tenant name with a line break is flattened to one line in the subject."""
        message = INVITATION_TEMPLATE.render(
            ADDRESS, link=LINK, expires_in=3600, service="Docs", tenant="Acme\r\nBcc: eve@evil"
        )
        assert "You are invited to join Acme Bcc: eve@evil on Docs" == message.subject

    def test_missing_placeholder_is_a_clear_error(self):
        """A template placeholder without a value names the placeholder."""
        with pytest.raises(ValueError, match="'tenant'"):
            INVITATION_TEMPLATE.render(ADDRESS, link=LINK, expires_in=60, service="Docs")

    @pytest.mark.parametrize(
        "link",
        ["javascript:alert(1)", "/relative/path", "https://x.example/a b", "ftp://x.example"],
    )
    def test_link_must_be_absolute_http(self, link):
        """Only an absolute http(s) URL without spaces is accepted as the link."""
        with pytest.raises(ValueError, match="link"):
            VERIFICATION_TEMPLATE.render(ADDRESS, link=link, expires_in=60, service="Docs")


class TestLoggingSender:
    async def test_logs_purpose_and_domain_only(self):
        """The log line names the purpose and the domain: no address, subject, body or link."""
        sender = LoggingSender()
        with capture_logs() as logs:
            await sender.send(verification())
        assert [
            {
                "event": "mail logged, not sent",
                "log_level": "info",
                "purpose": "verification",
                "recipient_domain": "example.com",
            }
        ] == logs
        flat = repr(logs)
        for secret in ("ada.lovelace", "tok_SECRET123", "Confirm your"):
            assert secret not in flat

    async def test_keeps_the_last_messages(self):
        """Only the last ``keep`` messages are kept, and ``last`` finds them by purpose and to."""
        sender = LoggingSender(keep=2)
        await sender.send(verification("a@example.com"))
        await sender.send(verification("b@example.com"))
        await sender.send(
            PASSWORD_RESET_TEMPLATE.render(
                "a@example.com", link=LINK, expires_in=60, service="Docs"
            )
        )
        assert ["b@example.com", "a@example.com"] == [m.to for m in sender.messages]
        assert "password_reset" == sender.last(to="A@example.com").purpose
        assert "b@example.com" == sender.last(purpose="verification").to
        with pytest.raises(LookupError):
            sender.last(purpose="invitation")
        sender.clear()
        assert () == sender.messages

    def test_negative_keep_is_refused(self):
        """``keep`` below 0 is a ValueError."""
        with pytest.raises(ValueError, match="keep"):
            LoggingSender(keep=-1)

    async def test_keep_zero_keeps_nothing(self):
        """With ``keep=0`` messages are logged and not kept."""
        sender = LoggingSender(keep=0)
        await sender.send(verification())
        assert () == sender.messages

    async def test_counts_logged_messages(self):
        """Each message counts as ``logged`` under its purpose."""
        before = mail_count("verification", "logged")
        await LoggingSender().send(verification())
        assert before + 1 == mail_count("verification", "logged")

    def test_senders_satisfy_the_protocol(self):
        """Both senders are MailSenders."""
        assert isinstance(LoggingSender(), MailSender)
        assert isinstance(plain_sender(25), MailSender)


class TestSmtpSender:
    async def test_message_arrives_with_headers_and_body(self, smtp_server):
        """The server receives one message with From, To, Subject, Date, Message-ID and the link."""
        handler, port = smtp_server
        async with plain_sender(port) as sender:
            await sender.send(
                dataclasses.replace(verification(), headers={"Reply-To": "help@docs.example.com"})
            )
        envelope = handler.envelopes[0]
        assert "no-reply@docs.example.com" == envelope.mail_from
        assert [ADDRESS] == envelope.rcpt_tos
        message = handler.message()
        assert "Bastion Docs <no-reply@docs.example.com>" == str(message["From"])
        assert ADDRESS == str(message["To"])
        assert "Confirm your e-mail address for Bastion Docs" == str(message["Subject"])
        assert "help@docs.example.com" == str(message["Reply-To"])
        assert str(message["Message-ID"]).endswith("@docs.example.com>")
        assert message["Date"] is not None
        assert message["Bcc"] is None
        body = message.get_body(("plain",))
        assert body is not None
        assert LINK in body.get_content()

    async def test_html_alternative_and_unicode(self, smtp_server):
        """An HTML alternative and non-ASCII text arrive intact as multipart/alternative."""
        handler, port = smtp_server
        message = OutgoingMail(
            to=ADDRESS,
            subject="Grüße from Zürich",
            text="Bonjour, voilà le lien.",
            html="<p>Bonjour, voilà <a href='https://x.example'>le lien</a>.</p>",
            purpose="greeting",
        )
        async with plain_sender(port) as sender:
            await sender.send(message)
        received = handler.message()
        assert "multipart/alternative" == received.get_content_type()
        assert "Grüße from Zürich" == str(received["Subject"])
        plain = received.get_body(("plain",))
        html = received.get_body(("html",))
        assert plain is not None
        assert html is not None
        assert "voilà le lien" in plain.get_content()
        assert "<a href='https://x.example'>" in html.get_content()
        assert handler.envelopes[0].content.isascii()

    async def test_transient_4xx_is_retried_then_succeeds(self, smtp_server):
        """A 451 to DATA is retried; the next attempt delivers the message once."""
        handler, port = smtp_server
        handler.data_replies = ["451 4.3.0 Try again later"]
        async with plain_sender(port) as sender:
            await sender.send(verification())
        assert 2 == handler.data_calls
        assert 1 == len(handler.envelopes)

    async def test_permanent_5xx_is_not_retried(self, smtp_server):
        """A 554 to DATA ends the send at once with MailDeliveryError (502), not retried."""
        handler, port = smtp_server
        handler.data_replies = ["554 5.7.1 Message rejected"]
        before = mail_count("verification", "rejected")
        async with plain_sender(port) as sender:
            with capture_logs() as logs, pytest.raises(MailDeliveryError) as caught:
                await sender.send(verification())
        assert 1 == handler.data_calls
        assert ("message_refused", 554, 502) == (
            caught.value.reason,
            caught.value.smtp_code,
            caught.value.status,
        )
        assert isinstance(caught.value, DependencyFailure)
        assert "Message rejected" not in caught.value.detail
        assert before + 1 == mail_count("verification", "rejected")
        assert "ada.lovelace" not in repr(logs)

    async def test_refused_recipient_is_permanent(self, smtp_server):
        """A 550 to RCPT is a refused recipient: not retried, no DATA sent."""
        handler, port = smtp_server
        handler.rcpt_replies = ["550 5.1.1 No such user"]
        async with plain_sender(port) as sender:
            with pytest.raises(MailDeliveryError) as caught:
                await sender.send(verification())
        assert ("recipient_refused", 550) == (caught.value.reason, caught.value.smtp_code)
        assert 0 == handler.data_calls

    async def test_4xx_on_every_attempt_ends_as_dependency_error(self, smtp_server):
        """4xx on every attempt: DependencyError from the pipeline after 1 + retries attempts."""
        handler, port = smtp_server
        handler.rcpt_replies = ["450 4.2.0 Mailbox busy"] * 10
        async with plain_sender(port, pipeline=smtp_pipeline(retries=2)) as sender:
            with pytest.raises(DependencyError) as caught:
                await sender.send(verification())
        assert 10 - 3 == len(handler.rcpt_replies)
        assert isinstance(caught.value.__cause__, smtplib.SMTPRecipientsRefused)
        assert 502 == caught.value.status

    async def test_server_down_is_a_dependency_failure(self):
        """No server listening: retried, then DependencyError (502), quickly."""
        port = free_port()
        before = mail_count("verification", "failed")
        started = time.monotonic()
        async with plain_sender(port) as sender:
            with pytest.raises(DependencyError) as caught:
                await sender.send(verification())
        assert isinstance(caught.value.__cause__, ConnectionRefusedError)
        assert time.monotonic() - started < 5
        assert before + 1 == mail_count("verification", "failed")

    async def test_silent_server_does_not_hang_past_the_timeout(self):
        """A server that accepts and never greets ends the send at the pipeline's timeout (503).

        Real time: the point is the wall-clock bound; the wait is 0.3 s.
        """
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            port = listener.getsockname()[1]
            pipe = smtp_pipeline(timeout=0.3, total_timeout=0.3, retries=0)
            started = time.monotonic()
            async with plain_sender(port, pipeline=pipe) as sender:
                with pytest.raises(DependencyTimeoutError) as caught:
                    await sender.send(verification())
            elapsed = time.monotonic() - started
        assert elapsed < 1.5
        assert 503 == caught.value.status

    async def test_socket_timeout_bounds_the_thread(self):
        """The sender's own timeout ends the blocked thread too, as a timeout (503).

        Real time: the sender's socket timeout is 0.2 s; the pipeline would wait 5 s.
        """
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            port = listener.getsockname()[1]
            pipe = smtp_pipeline(timeout=5.0, total_timeout=5.0, retries=0)
            sender = SmtpSender(
                "127.0.0.1",
                port,
                from_address="no-reply@docs.example.com",
                security="none",
                timeout=0.2,
                local_hostname="bastion.test",
                pipeline=pipe,
            )
            started = time.monotonic()
            with pytest.raises(DependencyTimeoutError) as caught:
                await sender.send(verification())
            await sender.aclose()
        assert isinstance(caught.value.__cause__, TimeoutError)
        assert time.monotonic() - started < 2.0

    async def test_login_and_wrong_password(self):
        """Login with the right password delivers; a 535 is final, not retried."""
        attempts: list[str] = []

        def authenticator(server, session, envelope, mechanism, auth_data):
            assert isinstance(auth_data, LoginPassword)
            attempts.append(auth_data.login.decode())
            # handled=False: aiosmtpd then answers 535 (by default it leaves the client waiting).
            return AuthResult(success=auth_data.password == b"s3cret-pass", handled=False)

        handler = Recorder()
        controller = _start(
            handler,
            authenticator=authenticator,
            auth_require_tls=False,
            auth_exclude_mechanism=["LOGIN"],
        )
        try:
            good = plain_sender(
                controller.port, username="bastion", password=SecretStr("s3cret-pass")
            )
            async with good:
                await good.send(verification())
            bad = plain_sender(controller.port, username="bastion", password="wrong")
            async with bad:
                with pytest.raises(MailDeliveryError) as caught:
                    await bad.send(verification())
        finally:
            controller.stop()
        assert 1 == len(handler.envelopes)
        assert ["bastion", "bastion"] == attempts
        assert ("authentication_failed", 535) == (caught.value.reason, caught.value.smtp_code)

    async def test_starttls_not_offered_is_refused(self, smtp_server):
        """With ``starttls`` and a server that does not offer it, nothing is sent in clear."""
        handler, port = smtp_server
        sender = SmtpSender(
            "127.0.0.1",
            port,
            from_address="no-reply@docs.example.com",
            security="starttls",
            local_hostname="bastion.test",
            pipeline=smtp_pipeline(),
        )
        async with sender:
            with pytest.raises(MailDeliveryError) as caught:
                await sender.send(verification())
        assert "unsupported" == caught.value.reason
        assert [] == handler.envelopes

    async def test_uses_the_current_registry_pipeline(self, smtp_server):
        """Without a pipeline argument the current registry's ``smtp`` pipeline is used."""
        handler, port = smtp_server
        registry = Resilience(ResilienceSettings())
        use_resilience(registry)
        try:
            async with plain_sender(port, pipeline=None) as sender:
                await sender.send(verification())
        finally:
            use_resilience(None)
        assert ["smtp"] == [snapshot.name for snapshot in registry.snapshots()]
        assert 1 == len(handler.envelopes)

    async def test_works_without_a_registry(self, smtp_server):
        """Outside an installed app the sender builds a pipeline of its own."""
        handler, port = smtp_server
        async with plain_sender(port, pipeline=None) as sender:
            await sender.send(verification())
        assert 1 == len(handler.envelopes)

    async def test_ping(self, smtp_server):
        """``ping`` succeeds on a live server and fails with DependencyError on a dead port."""
        _, port = smtp_server
        async with plain_sender(port) as sender:
            await sender.ping()
        async with plain_sender(free_port()) as dead:
            with pytest.raises(DependencyError):
                await dead.ping()

    async def test_sent_log_has_no_address(self, smtp_server):
        """The ``mail sent`` line carries purpose and domain, never the address or the link."""
        _, port = smtp_server
        async with plain_sender(port) as sender:
            with capture_logs() as logs:
                await sender.send(verification())
        sent = [line for line in logs if line["event"] == "mail sent"]
        assert 1 == len(sent)
        assert ("verification", "example.com") == (sent[0]["purpose"], sent[0]["recipient_domain"])
        assert "ada.lovelace" not in repr(logs)
        assert "tok_SECRET123" not in repr(logs)


class TestClassification:
    @pytest.mark.parametrize(
        ("error", "reason"),
        [
            (smtplib.SMTPResponseException(421, b"closing"), None),
            (smtplib.SMTPResponseException(-1, b"garbage"), None),
            (smtplib.SMTPServerDisconnected("gone"), None),
            (smtplib.SMTPRecipientsRefused({"a@example.com": (452, b"full")}), None),
            (smtplib.SMTPRecipientsRefused({"a@example.com": (550, b"no")}), "recipient_refused"),
            (smtplib.SMTPHeloError(501, b"bad helo"), "refused"),
            (smtplib.SMTPSenderRefused(553, b"no", "x@example.com"), "sender_refused"),
            (smtplib.SMTPDataError(552, b"too big"), "message_refused"),
            (smtplib.SMTPAuthenticationError(535, b"bad"), "authentication_failed"),
            (smtplib.SMTPNotSupportedError("no STARTTLS"), "unsupported"),
            (smtplib.SMTPException("No suitable authentication method found."), "protocol"),
        ],
    )
    def test_smtp_errors_are_classified(self, error, reason):
        """5xx and misconfiguration are final (with a reason); 4xx and lost connections are not."""
        permanent = _permanent(error)
        assert reason == (None if permanent is None else permanent.reason)


class TestSmtpConfiguration:
    @pytest.mark.parametrize(
        ("kwargs", "problem"),
        [
            ({"host": ""}, "host is empty"),
            ({"port": 0}, "port must be"),
            ({"timeout": 0}, "timeout must be positive"),
            ({"from_address": "not an address"}, "from_address"),
            ({"username": "u"}, "username and password go together"),
            ({"password": "p"}, "username and password go together"),
            (
                {"host": "smtp.example.com", "security": "none", "username": "u", "password": "p"},
                "plain text",
            ),
            ({"max_connections": 0}, "max_connections"),
            ({"security": "ssl"}, "security must be one of"),
            ({"from_name": "Docs\r\nBcc: x"}, "from_name"),
        ],
    )
    def test_bad_settings_are_refused(self, kwargs, problem):
        """Each bad setting is a ConfigurationError naming the problem."""
        arguments = {"host": "127.0.0.1", "from_address": "no-reply@example.com", **kwargs}
        with pytest.raises(ConfigurationError, match=problem):
            SmtpSender(**arguments)

    @pytest.mark.parametrize(("security", "port"), [("starttls", 587), ("tls", 465), ("none", 25)])
    def test_default_ports(self, security, port):
        """The port defaults to the one of the chosen security."""
        sender = SmtpSender("127.0.0.1", from_address="a@example.com", security=security)
        assert port == sender.port

    def test_login_over_plain_text_to_loopback_is_allowed(self):
        """A local relay on the loopback may take a login without TLS (development)."""
        SmtpSender("::1", security="none", from_address="a@example.com", username="u", password="p")

    def test_repr_has_no_password(self):
        """The repr names host, port and security only."""
        sender = SmtpSender(
            "127.0.0.1", from_address="a@example.com", username="u", password="hunter22"
        )
        assert "hunter22" not in repr(sender)
        assert "hunter22" not in repr(vars(sender))


def _certificate(tmp_path):
    """A self-signed certificate for 127.0.0.1: (server context, client context)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client = ssl.create_default_context(cadata=cert_pem.decode())
    return server, client


class TestSmtpTls:
    async def test_starttls(self, tmp_path):
        """STARTTLS with a private CA: the server requires it and the message arrives."""
        server_context, client_context = _certificate(tmp_path)
        handler = Recorder()
        controller = _start(handler, tls_context=server_context, require_starttls=True)
        try:
            sender = SmtpSender(
                "127.0.0.1",
                controller.port,
                from_address="no-reply@docs.example.com",
                security="starttls",
                ssl_context=client_context,
                local_hostname="bastion.test",
                pipeline=smtp_pipeline(),
            )
            async with sender:
                await sender.send(verification())
        finally:
            controller.stop()
        assert 1 == len(handler.envelopes)

    async def test_untrusted_certificate_is_final(self, tmp_path):
        """A certificate the client does not trust: MailDeliveryError, not retried."""
        server_context, _ = _certificate(tmp_path)
        handler = Recorder()
        controller = _start(handler, tls_context=server_context, require_starttls=True)
        try:
            sender = SmtpSender(
                "127.0.0.1",
                controller.port,
                from_address="no-reply@docs.example.com",
                security="starttls",
                local_hostname="bastion.test",
                pipeline=smtp_pipeline(),
            )
            async with sender:
                with pytest.raises(MailDeliveryError) as caught:
                    await sender.send(verification())
        finally:
            controller.stop()
        assert "certificate" == caught.value.reason
        assert [] == handler.envelopes

    async def test_implicit_tls(self, tmp_path):
        """Implicit TLS (``tls``): the connection is TLS from the first byte."""
        server_context, client_context = _certificate(tmp_path)
        handler = Recorder()
        controller = _start(handler, ssl_context=server_context)
        try:
            sender = SmtpSender(
                "127.0.0.1",
                controller.port,
                from_address="no-reply@docs.example.com",
                security="tls",
                ssl_context=client_context,
                local_hostname="bastion.test",
                pipeline=smtp_pipeline(),
            )
            async with sender:
                await sender.send(verification())
        finally:
            controller.stop()
        assert 1 == len(handler.envelopes)


async def test_cancellation_is_not_counted_as_failure(smtp_server):
    """A send cancelled by its caller is not counted as a failed message."""
    _, port = smtp_server
    before = mail_count("verification", "failed")
    async with plain_sender(port) as sender:
        task = asyncio.ensure_future(sender.send(verification()))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert before == mail_count("verification", "failed")
