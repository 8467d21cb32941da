"""URL fields and SSRF protection: validation-time checks and the fetch-time transport."""

import datetime
import ipaddress
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi import FastAPI
from guard_support import PROBLEM, install_bare
from pydantic import BaseModel, TypeAdapter, ValidationError

from bastion.errors import ErrorCode
from bastion.guard._urls import (
    FetchPolicy,
    FetchUrl,
    SafeTransport,
    UnsafeUrl,
    Url,
    _CheckedBackend,
    check_fetch_url,
    fetch_url_type,
    is_public_address,
    resolve_public,
)
from bastion.settings import GuardSettings
from bastion.testing import lifespan_client

EVIL_URLS = [
    "http://127.0.0.1/",
    "http://127.1/",
    "http://127.0.1/",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://0x7f.1/",
    "https://0x7F.0.0.1/",
    "http://0177.0.0.1/",
    "http://017700000001/",
    "http://0/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://[::1]/",
    "http://[::1]:80/",
    "http://[0:0:0:0:0:0:0:1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://[::127.0.0.1]/",
    "http://[2002:7f00:1::]/",
    "http://[64:ff9b::7f00:1]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[fd00::1]/",
    "http://[fc00::1]/",
    "http://[fe80::1]/",
    "http://[fec0::1]/",
    "http://[ff02::1]/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::ffff:169.254.169.254]/",
    "http://100.64.0.1/",
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://192.0.0.1/",
    "http://198.18.0.1/",
    "http://224.0.0.1/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
    "http://localhost/",
    "http://LOCALHOST./",
    "http://api.localhost/",
    "http://metadata.google.internal/",
    "http://printer.local/",
    "http://router.home.arpa/",
    "http://intranet/",
    "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/",
    "http://127。0。0。1/",
]
"""Each points inward; all are ``url_not_allowed``."""

MALFORMED_URLS = [
    "http://127.0.0.1:8080@evil.com/",
    "http://evil.com@127.0.0.1/",
    "http://user:pass@example.com/",
    "http://%31%32%37.0.0.1/",
    "http://127.0.0.1\\@evil.com/",
    "http://[fe80::1%25eth0]/",
    "http://exa mple.com/",
    "http://example.com/\x00",
    "http://example.com/a\nb",
    "http://exa\u200bmple.com/",
    "http:///path",
    "http://",
    "//example.com/",
    "example.com",
    "http://256.1.1.1/",
    "http://1.2.3.4.5/",
    "http://example.com:99999/",
    "http://-bad-.com/",
    "http://a..b.com/",
    "http://abc.1/",
    "http://xn--a.com/",
    "http://\u2488.com/",
    "http://\U0001f600.com/",
    "http://" + "a" * 64 + ".com/",
]
"""Each is refused as ``url_invalid``: credentials, odd hosts, whitespace, controls."""


def fetch_adapter(**options) -> TypeAdapter:
    return TypeAdapter(FetchUrl(**options))


def error_type(adapter: TypeAdapter, value: str) -> str:
    with pytest.raises(ValidationError) as caught:
        adapter.validate_python(value)
    return caught.value.errors()[0]["type"]


class TestUrl:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("https://example.com", "https://example.com/"),
            ("HTTPS://Example.COM/Path?Q=1#F", "https://example.com/Path?Q=1#F"),
            ("https://example.com:8443/a%20b", "https://example.com:8443/a%20b"),
            ("https://example.com/päth?q=ü", "https://example.com/p%C3%A4th?q=%C3%BC"),
            ("https://\u0440\u0430\u0443\u0440\u0430l.com/", "https://xn--l-7sba6dbr.com/"),
            ("https://bücher.example/", "https://xn--bcher-kva.example/"),
            ("http://127.1/", "http://127.0.0.1/"),
            ("http://[::FFFF:7f00:1]/", "http://[::ffff:7f00:1]/"),
            ("https://my_service.example.com/", "https://my_service.example.com/"),
        ],
    )
    def test_valid_urls_are_normalised(self, value, expected):
        """Scheme and host lowercased, IDN hosts punycoded (homographs stay visible as
        xn--), numeric IPv4 canonical, non-ASCII path characters percent-encoded."""
        assert expected == TypeAdapter(Url()).validate_python(value)

    def test_url_allows_private_hosts(self):
        """A URL only stored or shown may name any host, private ones included."""
        assert "http://localhost:8000/" == TypeAdapter(Url()).validate_python(
            "http://localhost:8000"
        )

    @pytest.mark.parametrize("value", MALFORMED_URLS)
    def test_malformed_urls_are_refused(self, value):
        """Credentials, odd hosts, whitespace and control characters are url_invalid."""
        assert error_type(TypeAdapter(Url()), value) in ("url_invalid", "url_scheme_not_allowed")

    @pytest.mark.parametrize(
        "value", ["javascript:alert(1)", "ftp://example.com/", "file:///etc/passwd", "data:,x"]
    )
    def test_scheme_outside_the_allow_list_is_refused(self, value):
        """Only the listed schemes pass (https and http by default)."""
        assert "url_scheme_not_allowed" == error_type(TypeAdapter(Url()), value)

    def test_custom_schemes(self):
        """A field may allow exactly the schemes it needs."""
        https_only = TypeAdapter(Url(schemes=("https",)))
        assert "url_scheme_not_allowed" == error_type(https_only, "http://example.com/")
        assert "https://example.com/" == https_only.validate_python("https://example.com")

    def test_bound_counts_the_normalised_url(self):
        """A URL over ``max_length`` is string_too_long with the limit."""
        with pytest.raises(ValidationError) as caught:
            TypeAdapter(Url(max_length=30)).validate_python("https://example.com/" + "a" * 20)
        assert ("string_too_long", {"limit": 30}) == (
            caught.value.errors()[0]["type"],
            caught.value.errors()[0]["ctx"],
        )


class TestFetchUrl:
    @pytest.mark.parametrize("value", EVIL_URLS)
    def test_inward_urls_are_refused(self, value):
        """Every spelling of a private, loopback, link-local, shared, multicast, reserved or
        unspecified address, and every local name, is url_not_allowed."""
        assert "url_not_allowed" == error_type(fetch_adapter(), value)

    @pytest.mark.parametrize("value", MALFORMED_URLS)
    def test_malformed_urls_are_refused(self, value):
        """What Url refuses, FetchUrl refuses too."""
        assert error_type(fetch_adapter(), value) in ("url_invalid", "url_scheme_not_allowed")

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("https://example.com/hook", "https://example.com/hook"),
            ("http://8.8.8.8:8080/x?q=1", "http://8.8.8.8:8080/x?q=1"),
            ("https://[2001:4860:4860::8888]/", "https://[2001:4860:4860::8888]/"),
            ("https://[::ffff:8.8.8.8]/", "https://[::ffff:808:808]/"),
            ("https://\u0440\u0430\u0443\u0440\u0430l.com/", "https://xn--l-7sba6dbr.com/"),
            ("https://1.2.3.example.com/", "https://1.2.3.example.com/"),
        ],
    )
    def test_public_urls_pass(self, value, expected):
        """Public names and addresses pass, normalised like Url."""
        assert expected == fetch_adapter().validate_python(value)

    def test_allow_private(self):
        """``allow_private`` lets private addresses and local names through."""
        adapter = fetch_adapter(allow_private=True)
        assert "http://127.0.0.1/" == adapter.validate_python("http://127.1")
        assert "http://localhost/" == adapter.validate_python("http://localhost")

    def test_allowed_hosts_are_exact(self):
        """An allowed host passes; its neighbours and subdomains do not."""
        adapter = fetch_adapter(allowed_hosts=["Search.Internal", "10.0.0.5"])
        assert "http://search.internal:9200/" == adapter.validate_python(
            "http://search.internal:9200"
        )
        assert "http://10.0.0.5/" == adapter.validate_python("http://10.0.0.5/")
        assert "url_not_allowed" == error_type(adapter, "http://x.search.internal/")
        assert "url_not_allowed" == error_type(adapter, "http://10.0.0.6/")

    def test_type_from_settings(self):
        """``fetch_url_type`` follows guard.fetch_allow_private and guard.fetch_allowed_hosts."""
        strict = TypeAdapter(fetch_url_type(GuardSettings()))
        hosts = TypeAdapter(fetch_url_type(GuardSettings(fetch_allowed_hosts=["vault.internal"])))
        anything = TypeAdapter(fetch_url_type(GuardSettings(fetch_allow_private=True)))
        assert "url_not_allowed" == error_type(strict, "http://vault.internal/")
        assert "http://vault.internal/" == hosts.validate_python("http://vault.internal/")
        assert "url_not_allowed" == error_type(hosts, "http://10.0.0.1/")
        assert "http://10.0.0.1/" == anything.validate_python("http://10.0.0.1/")

    async def test_http_422_names_the_reason_without_echo(self):
        """Over HTTP, an SSRF attempt is 422 INVALID_INPUT url_not_allowed, URL not echoed."""

        class Hook(BaseModel):
            target: FetchUrl()
            homepage: Url() = "https://example.com"

        app = FastAPI()

        @app.post("/hooks")
        async def create(hook: Hook) -> dict:
            return hook.model_dump()

        install_bare(app)
        async with lifespan_client(app) as client:
            refused = await client.post(
                "/hooks", json={"target": "http://169.254.169.254/latest/?token=S3CRETTOKEN"}
            )
            accepted = await client.post("/hooks", json={"target": "https://Example.com/h"})
            schema = (await client.get("/openapi.json")).json()
        assert (422, PROBLEM) == (refused.status_code, refused.headers["content-type"])
        body = refused.json()
        assert "INVALID_INPUT" == body["code"]
        assert [("body.target", "url_not_allowed")] == [
            (error["field"], error["code"]) for error in body["errors"]
        ]
        assert "S3CRETTOKEN" not in refused.text
        assert "169.254" not in refused.text
        assert "https://example.com/h" == accepted.json()["target"]
        target = schema["components"]["schemas"]["Hook"]["properties"]["target"]
        assert ("uri", 2048, "^(?:https|http)://") == (
            target["format"],
            target["maxLength"],
            target["pattern"],
        )


class TestPublicAddress:
    @pytest.mark.parametrize(
        ("address", "public"),
        [
            ("8.8.8.8", True),
            ("1.1.1.1", True),
            ("2606:4700:4700::1111", True),
            ("::ffff:8.8.8.8", True),
            ("2002:808:808::1", True),
            ("64:ff9b::808:808", True),
            ("127.0.0.1", False),
            ("10.1.2.3", False),
            ("100.100.100.200", False),
            ("169.254.169.254", False),
            ("192.0.0.8", False),
            ("192.88.99.1", False),
            ("0.0.0.0", False),
            ("224.0.0.251", False),
            ("233.252.0.1", False),
            ("::", False),
            ("::1", False),
            ("::ffff:10.0.0.1", False),
            ("::7f00:1", False),
            ("2002:a00:1::", False),
            ("64:ff9b::a00:1", False),
            ("64:ff9b:1::1", False),
            ("fd12::1", False),
            ("fe80::1", False),
            ("fec0::1", False),
            ("ff0e::1", False),
            ("2001:db8::1", False),
        ],
    )
    def test_classification(self, address, public):
        """Only globally routable unicast addresses are public, embedded IPv4 judged as IPv4."""
        assert public == is_public_address(ipaddress.ip_address(address))


class TestCheckFetchUrl:
    def test_refusal_is_unsafe_url(self):
        """A refused URL raises UnsafeUrl: INVALID_INPUT with code url_not_allowed."""
        with pytest.raises(UnsafeUrl) as caught:
            check_fetch_url("http://127.0.0.1/", field="body.callback")
        problem = caught.value.problem("cid")
        assert (ErrorCode.INVALID_INPUT, 422) == (caught.value.code, caught.value.status)
        assert [("body.callback", "url_not_allowed")] == [
            (error["field"], error["code"]) for error in problem["errors"]
        ]

    def test_allowed_url_is_normalised(self):
        """An allowed URL comes back normalised."""
        assert "https://example.com/" == check_fetch_url("HTTPS://EXAMPLE.com")


class TestResolvePublic:
    async def test_literal_public_address_needs_no_dns(self):
        """A public literal address is returned as is."""
        assert [ipaddress.ip_address("8.8.8.8")] == await resolve_public("https://8.8.8.8/")

    async def test_private_literal_and_names_are_refused(self):
        """Private literals and local names are refused before any lookup."""
        for url in ("http://127.0.0.1/", "http://localhost/", "http://[::1]:8080/"):
            with pytest.raises(UnsafeUrl):
                await resolve_public(url)

    async def test_allowed_host_resolves_to_private(self):
        """A trusted host may resolve to loopback; every answer is returned."""
        addresses = await resolve_public("http://localhost/", allowed_hosts=["localhost"])
        assert addresses
        assert all(address.is_loopback for address in addresses)

    async def test_settings_widen_the_policy(self):
        """guard settings given to resolve_public apply."""
        settings = GuardSettings(fetch_allow_private=True)
        assert [ipaddress.ip_address("10.0.0.1")] == await resolve_public(
            "http://10.0.0.1/", settings=settings
        )

    async def test_name_resolving_privately_is_refused_at_connect(self):
        """The fetch-time check judges resolved addresses, not names: a name that resolves
        to loopback is refused even when no name rule catches it."""
        backend = _CheckedBackend(FetchPolicy())
        with pytest.raises(UnsafeUrl):
            await backend.connect_tcp("localhost", 80)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", parse_qs(url.query)["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = (self.headers.get("Host") or "").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def local_server():
    """A real HTTP server on 127.0.0.1 that echoes the Host header and redirects on request."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join()


def _self_signed(directory) -> tuple[str, str]:
    """A certificate for the name ``localhost`` only (no IP address in it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """A real HTTPS server on 127.0.0.1 with a certificate for ``localhost``; records SNI."""
    cert, key = _self_signed(tmp_path_factory.mktemp("tls"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    seen_sni: list[str | None] = []
    context.sni_callback = lambda _socket, name, _context: seen_sni.append(name)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], cert, seen_sni
    server.shutdown()
    server.server_close()
    thread.join()


class TestSafeTransport:
    async def test_loopback_is_refused(self, local_server):
        """By default the transport will not fetch from the machine itself."""
        async with httpx.AsyncClient(transport=SafeTransport(), trust_env=False) as client:
            with pytest.raises(UnsafeUrl):
                await client.get(f"http://127.0.0.1:{local_server}/ok")
            with pytest.raises(UnsafeUrl):
                await client.get(f"http://localhost:{local_server}/ok")

    async def test_allow_private_fetches(self, local_server):
        """With allow_private the same fetch succeeds."""
        async with httpx.AsyncClient(
            transport=SafeTransport(allow_private=True), trust_env=False
        ) as client:
            response = await client.get(f"http://127.0.0.1:{local_server}/ok")
        assert 200 == response.status_code

    async def test_allowed_host_keeps_its_host_header(self, local_server):
        """A trusted name is connected through a checked address with the Host header kept."""
        transport = SafeTransport(settings=GuardSettings(fetch_allowed_hosts=["localhost"]))
        async with httpx.AsyncClient(transport=transport, trust_env=False) as client:
            response = await client.get(f"http://localhost:{local_server}/ok")
        assert (200, f"localhost:{local_server}") == (response.status_code, response.text)

    async def test_https_keeps_sni_and_certificate_name(self, tls_server):
        """Over TLS the connection goes to a checked address while SNI, the certificate
        check and the Host header keep the name."""
        port, cert, seen_sni = tls_server
        transport = SafeTransport(
            allowed_hosts=["localhost"], verify=ssl.create_default_context(cafile=cert)
        )
        async with httpx.AsyncClient(transport=transport, trust_env=False) as client:
            response = await client.get(f"https://localhost:{port}/ok")
        assert (200, f"localhost:{port}") == (response.status_code, response.text)
        assert "localhost" in seen_sni

    async def test_redirect_to_private_host_is_refused(self, local_server):
        """A trusted first hop cannot redirect the fetch to another private host."""
        transport = SafeTransport(allowed_hosts=["localhost"])
        async with httpx.AsyncClient(
            transport=transport, trust_env=False, follow_redirects=True
        ) as client:
            for target in (
                f"http://127.0.0.1:{local_server}/ok",
                "http://169.254.169.254/latest/meta-data/",
                "http://[::1]/",
            ):
                with pytest.raises(UnsafeUrl):
                    await client.get(
                        f"http://localhost:{local_server}/redirect", params={"to": target}
                    )
            same_host = await client.get(
                f"http://localhost:{local_server}/redirect",
                params={"to": f"http://localhost:{local_server}/ok"},
            )
        assert 200 == same_host.status_code

    async def test_scheme_outside_the_list_is_refused(self):
        """The transport checks schemes like FetchUrl does."""
        transport = SafeTransport(schemes=("https",), allow_private=True)
        async with httpx.AsyncClient(transport=transport, trust_env=False) as client:
            with pytest.raises(UnsafeUrl):
                await client.get("http://example.com/")

    async def test_closed_port_is_a_connect_error(self, local_server):
        """An allowed address that refuses the connection is an httpx.ConnectError."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            closed_port = probe.getsockname()[1]
        async with httpx.AsyncClient(
            transport=SafeTransport(allow_private=True), trust_env=False
        ) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://127.0.0.1:{closed_port}/")

    async def test_unresolvable_name_is_a_connect_error(self):
        """A name that does not resolve is an httpx.ConnectError, not an UnsafeUrl."""
        async with httpx.AsyncClient(transport=SafeTransport(), trust_env=False) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get("http://does-not-exist.invalid/")
