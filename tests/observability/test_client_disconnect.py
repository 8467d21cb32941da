"""A client that hangs up while the app reads its body is not a server error."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

import bastion


def _requests(status: str) -> float:
    value = REGISTRY.get_sample_value(
        "http_server_request_duration_seconds_count",
        {
            "http_request_method": "POST",
            "http_route": "/upload",
            "http_response_status_code": status,
        },
    )
    return value or 0.0


async def test_disconnect_mid_body_is_logged_as_499_not_500() -> None:
    """No 'unhandled error', nothing sent, and the request is counted as 499, not 500."""
    app = FastAPI()

    @app.post("/upload")
    async def upload(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    bastion.install(
        app, database={"enabled": False}, audit={"enabled": False}, flags={"enabled": False}
    )
    messages = iter(
        [
            {"type": "http.request", "body": b"part", "more_body": True},
            {"type": "http.disconnect"},
        ]
    )
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/upload",
        "raw_path": b"/upload",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/octet-stream")],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
    before_499, before_500 = _requests("499"), _requests("500")
    with capture_logs() as logs:
        await app(scope, receive, send)
    assert [] == sent
    assert not [entry for entry in logs if entry["event"] == "unhandled error"]
    assert before_499 + 1 == _requests("499")
    assert before_500 == _requests("500")
