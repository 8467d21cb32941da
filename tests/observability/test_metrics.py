"""Prometheus metrics: the HTTP RED recorder, the /metrics endpoint, health gauges, the API."""

import importlib

import pytest
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY, CollectorRegistry, Histogram
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from starlette.applications import Starlette

import bastion
from bastion.observability import HttpMetrics
from bastion.observability import metrics as public_metrics
from bastion.observability._http_metrics import _observer
from bastion.observability._metrics import HTTP_ACTIVE_REQUESTS, HTTP_REQUEST_DURATION
from bastion.settings import MetricsSettings
from bastion.testing import lifespan_client

PROBLEM = "application/problem+json"
DURATION = "http_server_request_duration_seconds"
TENANT_DURATION = "bastion_http_tenant_request_duration_seconds"


def sample(name: str, **labels: str) -> float:
    """The current value of one sample in the default registry (0 when absent)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def request_count(method: str, route: str, status: str) -> float:
    return sample(
        f"{DURATION}_count",
        http_request_method=method,
        http_route=route,
        http_response_status_code=status,
    )


def finish(recorder: HttpMetrics, method="GET", route="/r", status=200, tenant=None, **extra):
    recorder.started(method)
    recorder.finished(
        method=method,
        route=route,
        status=status,
        duration=extra.get("duration", 0.003),
        request_bytes=extra.get("request_bytes", 0),
        response_bytes=extra.get("response_bytes", 10),
        tenant=tenant,
    )


def make_app(framework=FastAPI, **overrides) -> Starlette:
    app = framework()
    settings = {"database": {"enabled": False}, "logging": {"enabled": False}, **overrides}
    bastion.install(app, **settings)
    return app


class TestHttpMetrics:
    def test_records_duration_by_method_route_and_status(self):
        """One finished request adds one observation under its method, route and status."""
        before = request_count("GET", "/t/records/{id}", "201")
        finish(HttpMetrics(MetricsSettings()), route="/t/records/{id}", status=201)
        assert 1.0 == request_count("GET", "/t/records/{id}", "201") - before

    def test_observes_body_sizes(self):
        """Request and response body sizes land in their histograms by method and route."""
        labels = {"http_request_method": "POST", "http_route": "/t/sizes"}
        request_before = sample("http_server_request_body_size_bytes_sum", **labels)
        response_before = sample("http_server_response_body_size_bytes_sum", **labels)
        recorder = HttpMetrics(MetricsSettings())
        finish(recorder, method="POST", route="/t/sizes", request_bytes=300, response_bytes=40)
        assert (300.0, 40.0) == (
            sample("http_server_request_body_size_bytes_sum", **labels) - request_before,
            sample("http_server_response_body_size_bytes_sum", **labels) - response_before,
        )

    def test_in_flight_rises_on_start_and_falls_on_finish(self):
        """http_server_active_requests counts requests between started and finished."""
        recorder = HttpMetrics(MetricsSettings())
        before = sample("http_server_active_requests", http_request_method="PATCH")
        recorder.started("PATCH")
        during = sample("http_server_active_requests", http_request_method="PATCH")
        recorder.finished(
            method="PATCH", route="/t/x", status=204, duration=0.001,
            request_bytes=0, response_bytes=0,
        )  # fmt: skip
        after = sample("http_server_active_requests", http_request_method="PATCH")
        assert (1.0, 0.0) == (during - before, after - before)

    def test_unknown_methods_share_other(self):
        """Methods outside the known list are labelled _OTHER, not as sent."""
        recorder = HttpMetrics(MetricsSettings())
        before = request_count("_OTHER", "/t/methods", "405")
        finish(recorder, method="BREW", route="/t/methods", status=405)
        finish(recorder, method="PROPFIND", route="/t/methods", status=405)
        assert 2.0 == request_count("_OTHER", "/t/methods", "405") - before
        assert 0.0 == request_count("BREW", "/t/methods", "405")

    def test_unknown_methods_do_not_grow_the_cache(self):
        """A client sending ever new methods cannot grow the recorder's memory."""
        recorder = HttpMetrics(MetricsSettings())
        for index in range(50):
            finish(recorder, method=f"M{index}", route="/t/flood")
        assert (0, 0) == (len(recorder._children), len(recorder._in_flight))

    def test_label_children_are_resolved_once(self, monkeypatch):
        """After a request of a kind, the next ones record without calling .labels()."""
        recorder = HttpMetrics(MetricsSettings())
        finish(recorder, route="/t/cached")
        before = request_count("GET", "/t/cached", "200")

        def refuse(*args, **kwargs):
            raise AssertionError(".labels() called on the hot path")

        monkeypatch.setattr(HTTP_REQUEST_DURATION, "labels", refuse)
        monkeypatch.setattr(HTTP_ACTIVE_REQUESTS, "labels", refuse)
        finish(recorder, route="/t/cached")
        assert 1.0 == request_count("GET", "/t/cached", "200") - before

    def test_tenant_is_ignored_when_the_label_is_off(self):
        """With metrics.tenant_label off, a tenant leaves no tenant-labelled sample."""
        finish(HttpMetrics(MetricsSettings()), route="/t/tenant-off", tenant="acme-off")
        assert 0.0 == sample(
            f"{TENANT_DURATION}_count",
            tenant="acme-off",
            http_request_method="GET",
            http_response_status_code="200",
        )

    def test_tenant_label_is_bounded(self):
        """Past tenant_label_limit distinct tenants, the rest are counted as other."""
        recorder = HttpMetrics(MetricsSettings(tenant_label=True, tenant_label_limit=2))
        labels = {"http_request_method": "DELETE", "http_response_status_code": "204"}
        other_before = sample(f"{TENANT_DURATION}_count", tenant="other", **labels)
        for tenant in ["bound-a", "bound-b", "bound-c", "bound-d", "bound-a"]:
            finish(recorder, method="DELETE", status=204, tenant=tenant)
        counts = [
            sample(f"{TENANT_DURATION}_count", tenant=tenant, **labels)
            for tenant in ["bound-a", "bound-b", "bound-c", "bound-d"]
        ]
        other = sample(f"{TENANT_DURATION}_count", tenant="other", **labels) - other_before
        assert ([2.0, 1.0, 0.0, 0.0], 2.0) == (counts, other)


class TestEndpoint:
    async def test_text_format_by_default(self):
        """Without an Accept header the scrape is Prometheus text format 0.0.4."""
        async with lifespan_client(make_app()) as client:
            response = await client.get("/metrics")
        assert 200 == response.status_code
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert f"# TYPE {DURATION} histogram" in response.text

    async def test_openmetrics_when_accepted(self):
        """Accept: application/openmetrics-text gets OpenMetrics that its parser reads."""
        accept = "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
        async with lifespan_client(make_app()) as client:
            response = await client.get("/metrics", headers={"accept": accept})
        assert response.headers["content-type"].startswith("application/openmetrics-text")
        names = {family.name for family in text_string_to_metric_families(response.text)}
        assert {"http_server_request_duration_seconds", "bastion_ready"} <= names

    async def test_gzip_when_accepted(self):
        """A scraper accepting gzip gets a compressed body that decompresses to the scrape."""
        async with lifespan_client(make_app()) as client:
            response = await client.get("/metrics", headers={"accept-encoding": "gzip"})
        assert "gzip" == response.headers["content-encoding"]
        assert "# TYPE bastion_ready gauge" in response.text

    async def test_custom_path(self):
        """metrics.path moves the endpoint."""
        async with lifespan_client(make_app(metrics={"path": "/internal/metrics"})) as client:
            moved = await client.get("/internal/metrics")
            old = await client.get("/metrics")
        assert (200, 404) == (moved.status_code, old.status_code)

    async def test_absent_when_disabled(self):
        """metrics.enabled=false mounts no endpoint."""
        async with lifespan_client(make_app(metrics={"enabled": False})) as client:
            response = await client.get("/metrics")
        assert 404 == response.status_code

    async def test_outside_allowed_networks_is_403(self):
        """A caller outside metrics.allowed_networks gets a FORBIDDEN problem."""
        app = make_app(metrics={"allowed_networks": ["10.0.0.0/8"]})
        async with lifespan_client(app) as client:
            response = await client.get("/metrics")
        assert (403, PROBLEM, "FORBIDDEN") == (
            response.status_code,
            response.headers["content-type"],
            response.json()["code"],
        )

    async def test_inside_allowed_networks_is_200(self):
        """A caller inside metrics.allowed_networks is served."""
        app = make_app(metrics={"allowed_networks": ["127.0.0.0/8"]})
        async with lifespan_client(app) as client:
            response = await client.get("/metrics")
        assert 200 == response.status_code

    @pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic c2NyYXBlcg=="])
    async def test_missing_or_wrong_token_is_401(self, authorization):
        """With metrics.token set, no token or a wrong one gets UNAUTHENTICATED and a challenge."""
        headers = {"authorization": authorization} if authorization else {}
        async with lifespan_client(make_app(metrics={"token": "s3cret"})) as client:
            response = await client.get("/metrics", headers=headers)
        assert (401, "UNAUTHENTICATED") == (response.status_code, response.json()["code"])
        assert response.headers["www-authenticate"].startswith("Bearer")

    async def test_right_token_is_200(self):
        """The configured bearer token is admitted."""
        async with lifespan_client(make_app(metrics={"token": "s3cret"})) as client:
            response = await client.get("/metrics", headers={"authorization": "Bearer s3cret"})
        assert 200 == response.status_code

    async def test_not_in_openapi(self):
        """/metrics is operational: it stays out of the app's OpenAPI document."""
        async with lifespan_client(make_app()) as client:
            paths = (await client.get("/openapi.json")).json()["paths"]
        assert "/metrics" not in paths


class TestRedThroughTheMiddleware:
    """End to end: needs the request middleware to call HttpMetrics."""

    @staticmethod
    def app_with_routes() -> FastAPI:
        app = FastAPI()

        @app.get("/red/items/{item_id}")
        async def item(item_id: int) -> dict[str, int]:
            return {"item_id": item_id}

        @app.get("/red/broken")
        async def broken() -> None:
            raise RuntimeError("boom")

        bastion.install(app, database={"enabled": False}, logging={"enabled": False})
        return app

    async def test_route_template_not_raw_path(self):
        """Requests are labelled by the route template, never by the path they used."""
        before = request_count("GET", "/red/items/{item_id}", "200")
        async with lifespan_client(self.app_with_routes()) as client:
            for item_id in (1, 2, 3):
                await client.get(f"/red/items/{item_id}")
            scrape = (await client.get("/metrics")).text
        assert 3.0 == request_count("GET", "/red/items/{item_id}", "200") - before
        assert "/red/items/1" not in scrape

    async def test_errors_are_labelled_with_their_status(self):
        """An unhandled error is recorded as a 500 under its route."""
        before = request_count("GET", "/red/broken", "500")
        async with lifespan_client(self.app_with_routes()) as client:
            await client.get("/red/broken")
        assert 1.0 == request_count("GET", "/red/broken", "500") - before

    async def test_unknown_method_is_other(self):
        """A request with an invented method is labelled _OTHER end to end."""
        async with lifespan_client(self.app_with_routes()) as client:
            await client.request("BREW", "/red/items/1")
            scrape = (await client.get("/metrics")).text
        assert 'http_request_method="BREW"' not in scrape
        assert 'http_request_method="_OTHER"' in scrape


class TestHealthGauges:
    async def test_gauges_follow_readiness(self):
        """bastion_ready and bastion_health_check_up are 0 after a failing run, 1 after a pass."""
        app = make_app()
        failing = True

        async def flaky() -> None:
            if failing:
                raise ConnectionRefusedError("refused")

        app.state.bastion.health.register("gauge-flaky", flaky)
        async with lifespan_client(app) as client:
            first = await client.get("/health/ready")
            after_fail = (
                sample("bastion_ready"),
                sample("bastion_health_check_up", check="gauge-flaky"),
            )
            failing = False
            second = await client.get("/health/ready")
            after_pass = (
                sample("bastion_ready"),
                sample("bastion_health_check_up", check="gauge-flaky"),
            )
        assert (503, 200) == (first.status_code, second.status_code)
        assert ((0.0, 0.0), (1.0, 1.0)) == (after_fail, after_pass)

    async def test_non_critical_failure_leaves_ready_but_check_down(self):
        """A failing non-critical check is down in its gauge while the process stays ready."""
        app = make_app()

        async def down() -> None:
            raise ConnectionRefusedError("refused")

        app.state.bastion.health.register("gauge-optional", down, critical=False)
        async with lifespan_client(app) as client:
            await client.get("/health/ready")
        assert (1.0, 0.0) == (
            sample("bastion_ready"),
            sample("bastion_health_check_up", check="gauge-optional"),
        )


class TestPublicApi:
    def test_every_fixed_metric_is_public(self):
        """bastion.observability.metrics re-exports every object the metrics module fixes."""
        private = importlib.import_module("bastion.observability._metrics")
        assert sorted(private.__all__) == list(public_metrics.__all__)
        assert all(getattr(public_metrics, n) is getattr(private, n) for n in private.__all__)

    def test_data_layer_records_into_the_public_objects(self):
        """bastion.data imports its metrics from the public module (one family per name)."""
        instrumentation = importlib.import_module("bastion.data._instrumentation")
        assert public_metrics.DB_OPERATION_DURATION is instrumentation.DB_OPERATION_DURATION


class TestDirectObservation:
    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.one_of(
                st.floats(min_value=0, max_value=1e6, allow_nan=False),
                st.sampled_from([0.005, 0.01, 0.1, 1.0, 10.0, 0.0]),
            ),
            max_size=30,
        )
    )
    def test_the_recorder_fills_buckets_and_sum_exactly_as_observe(self, values):
        """Bucket bounds included (a value equal to a bound counts in that bucket)."""
        registry = CollectorRegistry()
        buckets = (0.005, 0.01, 0.1, 1.0, 10.0)
        ours = Histogram("ours", "d", buckets=buckets, registry=registry)
        public = Histogram("public", "d", buckets=buckets, registry=registry)
        record = _observer(ours)
        for value in values:
            record(value)
            public.observe(value)
        samples = {
            family.name: sorted(
                (s.name.split("_", 1)[1], tuple(sorted(s.labels.items())), s.value)
                for s in family.samples
                if not s.name.endswith("_created")
            )
            for family in registry.collect()
        }
        assert samples["ours"] == samples["public"]
