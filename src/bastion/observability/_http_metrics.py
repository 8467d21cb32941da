"""HTTP RED metrics: what the request middleware records once per request.

STUB written by the lead to fix the interface; the metrics work fills it in.
:class:`bastion.observability.RequestMiddleware` calls :meth:`HttpMetrics.started`
when a request enters and :meth:`HttpMetrics.finished` once its response is sent
(or failed), with the route template it resolved once for logs, metrics and the
span name.
"""

from __future__ import annotations

from bastion.settings import MetricsSettings

__all__ = ["HttpMetrics"]


class HttpMetrics:
    """Records ``http_server_*`` metrics (names in :mod:`bastion.observability._metrics`).

    Args:
        settings: the ``metrics`` section.
    """

    def __init__(self, settings: MetricsSettings) -> None:
        self.settings = settings

    def started(self, method: str) -> None:
        """A request entered: one more in flight."""

    def finished(
        self,
        *,
        method: str,
        route: str,
        status: int,
        duration: float,
        request_bytes: int,
        response_bytes: int,
        tenant: str | None = None,
    ) -> None:
        """A request ended: one fewer in flight, its duration and body sizes observed.

        Args:
            method: the request method as received.
            route: the route template (``/v1/documents/{document_id}``), or the
                shared value for unmatched requests.
            status: the status sent (500 when none was).
            duration: seconds from entry to the end of the response.
            request_bytes: body bytes received.
            response_bytes: body bytes sent.
            tenant: the tenant, when identity knows it (labelled only when
                ``metrics.tenant_label`` is on, and bounded).
        """
