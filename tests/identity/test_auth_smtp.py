"""Sign-up to verified login with a real SMTP server: the link is read from the delivered mail."""

from __future__ import annotations

import email
import email.policy
import socket

import pytest
from aiosmtpd.controller import Controller
from auth_support import PASSWORD, link_token, login, make_app, unique_email, unique_slug

from bastion.testing import lifespan_client


class Inbox:
    """An aiosmtpd handler keeping every delivered message."""

    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 -- aiosmtpd's hook name
        self.messages.append(
            email.message_from_bytes(envelope.content, policy=email.policy.default)
        )
        return "250 Message accepted for delivery"


@pytest.fixture
def inbox():
    """A real SMTP server on a free loopback port (plain text, as to a local relay)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    handler = Inbox()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    yield handler, port
    controller.stop()


async def test_signup_mail_verify_login_over_smtp(database_url, inbox):
    """The verification mail arrives over SMTP; its link verifies; login then succeeds."""
    handler, port = inbox
    app, _ = make_app(
        database_url,
        identity={
            "mail": {
                "sender": "smtp",
                "smtp_host": "127.0.0.1",
                "smtp_port": port,
                "smtp_security": "none",
                "from_address": "no-reply@docs.example.com",
                "from_name": "Bastion Docs",
                "link_base": "https://docs.example.com/app",
            }
        },
    )
    address = unique_email("smtp")
    async with lifespan_client(app) as client:
        response = await client.post(
            "/v1/auth/signup",
            json={
                "email": address,
                "password": PASSWORD,
                "tenant": {"name": "Mail Co", "slug": unique_slug()},
            },
        )
        assert 202 == response.status_code
        (message,) = handler.messages
        assert address == message["To"]
        assert "Bastion Docs" in message["Subject"]
        text = message.get_content()
        assert "https://docs.example.com/app/verify-email?token=" in text
        verified = await client.post("/v1/auth/verify-email", json={"token": link_token(text)})
        assert 200 == verified.status_code
        logged_in = await login(client, address)
        assert 200 == logged_in.status_code, logged_in.text
        assert "Mail Co" == logged_in.json()["tenant"]["name"]
