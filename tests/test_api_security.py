"""The service's defences through the real ASGI app: security headers, the dashboard's
cookie and sign-out, the operator claim, and keys fetched from a JWKS URL over HTTPS
(served by a real TLS server on 127.0.0.1 with a certificate made here)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import re
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient

from byod.api import AuthSettings, HttpSettings, create_app
from byod.api.dashboard import STYLE
from byod.errors import SettingsError
from byod.workspace import Workspace
from tests import test_api
from tests.test_api import SECRET, Api, bearer, token

api = test_api.api  # the same fixture: two users with SQLite instances and an operator


def test_every_response_carries_the_security_headers(api: Api) -> None:
    responses = {
        "api": api.get("/v1/me/instance", "user_a"),
        "401": api.client.get("/v1/me/instance"),
        "dashboard": api.client.get("/dashboard"),
        "404": api.client.get("/nowhere"),
    }
    for name, response in responses.items():
        headers = response.headers
        assert headers["x-content-type-options"] == "nosniff", name
        assert headers["x-frame-options"] == "DENY", name
        assert headers["referrer-policy"] == "no-referrer", name
        assert headers["cache-control"] == "no-store", name
        assert "frame-ancestors 'none'" in headers["content-security-policy"], name
    csp = responses["dashboard"].headers["content-security-policy"]
    assert "script-src" not in csp and "'unsafe-inline'" not in csp  # default-src 'none'
    digest = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
    assert f"style-src 'sha256-{digest}'" in csp
    page_style = re.search(r"<style>(.*?)</style>", responses["dashboard"].text, re.S)
    assert page_style is not None and page_style.group(1) == STYLE  # the hash fits the page


def test_the_openapi_document_lists_413_for_a_body_too_large(api: Api) -> None:
    document = api.client.get("/openapi.json").json()
    run = document["paths"]["/v1/fleet/runs"]["post"]
    assert run["responses"]["413"]["content"]["application/problem+json"]


def _signed_in(client: TestClient) -> str:
    response = client.post(
        "/dashboard/login", data={"token": token("ops", admin=True)}, follow_redirects=False
    )
    assert response.status_code == 303
    return str(response.headers["set-cookie"])


def test_the_cookie_is_secure_over_https_only(cws: Workspace) -> None:
    cws.directory.add_user("ops")
    app = create_app(cws, AuthSettings(secret=SECRET))
    with TestClient(app, base_url="https://byod.example") as client:
        cookie = _signed_in(client).lower()
        assert "; secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
        assert "path=/dashboard" in cookie
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert "secure" not in _signed_in(client).lower()


def test_sign_out_is_a_post_and_a_get_signs_nobody_out(api: Api) -> None:
    _signed_in(api.client)
    page = api.client.get("/dashboard")
    assert "id='sign-out'" in page.text and "method='post' action='/dashboard/logout'" in page.text
    link = api.client.get("/dashboard/logout", follow_redirects=False)
    assert link.status_code == 405 and "set-cookie" not in link.headers
    assert "versions-chart" in api.client.get("/dashboard").text  # still signed in
    forged = api.client.post(
        "/dashboard/logout", headers={"Sec-Fetch-Site": "cross-site"}, follow_redirects=False
    )
    assert forged.status_code == 403 and "set-cookie" not in forged.headers
    forged_in = api.client.post(
        "/dashboard/login",
        data={"token": token("ops", admin=True)},
        headers={"Sec-Fetch-Site": "cross-site"},
    )
    assert forged_in.status_code == 403
    out = api.client.post(
        "/dashboard/logout", headers={"Sec-Fetch-Site": "same-origin"}, follow_redirects=False
    )
    assert out.status_code == 303 and 'byod_token=""' in out.headers["set-cookie"]
    assert 'id="sign-in"' in api.client.get("/dashboard").text


def test_a_short_hs256_secret_is_refused() -> None:
    with pytest.raises(SettingsError, match="at least 32"):
        AuthSettings(secret="x")
    with pytest.raises(SettingsError, match="at least 32"):
        AuthSettings.from_env({"BYOD_JWT_SECRET": "s" * 31})
    assert AuthSettings.from_env({"BYOD_JWT_SECRET": "s" * 32}).secret


def test_the_operator_role_comes_from_the_configured_claim(cws: Workspace) -> None:
    cws.directory.add_user("ops")
    settings = AuthSettings.from_env(
        {
            "BYOD_JWT_SECRET": SECRET,
            "BYOD_JWT_ROLE_CLAIM": "public_metadata.byod_role",
            "BYOD_JWT_ADMIN_VALUE": "operator",
        }
    )
    with TestClient(create_app(cws, settings)) as client:

        def status(**claims: Any) -> int:
            response = client.get("/v1/fleet/status", headers=bearer(token("ops", **claims)))
            return int(response.status_code)

        assert status(public_metadata={"byod_role": "operator"}) == 200
        assert status(public_metadata={"byod_role": ["viewer", "operator"]}) == 200
        assert status(public_metadata={"byod_role": "admin"}) == 403
        assert status(byod_role="operator") == 403  # the top-level claim no longer counts
        assert status(public_metadata="operator") == 403
        denied = client.get("/v1/fleet/status", headers=bearer(token("ops")))
        assert "public_metadata.byod_role: operator" in denied.json()["detail"]


# -- keys from a JWKS URL -------------------------------------------------------------------


class _Jwks:
    """A JWKS endpoint over HTTPS on 127.0.0.1 with a self-signed certificate."""

    def __init__(self, folder: Path, keys: dict[str, Any]) -> None:
        self.fetches = 0
        self.keys = keys
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        self.ca = folder / "jwks-ca.pem"
        self.ca.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file = folder / "jwks-key.pem"
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                endpoint.fetches += 1
                body = json.dumps({"keys": list(endpoint.keys.values())}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.ca, key_file)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def _es256_jwk(kid: str) -> tuple[Any, dict[str, Any]]:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return key, jwk | {"kid": kid, "alg": "ES256", "use": "sig"}


def _es256(key: Any, kid: str, sub: str = "someone", **claims: Any) -> str:
    payload = {"sub": sub, "exp": int(time.time()) + 60, **claims}
    return jwt.encode(payload, key, algorithm="ES256", headers={"kid": kid})


@pytest.fixture
def jwks(tmp_path: Path) -> Iterator[tuple[_Jwks, Any]]:
    key, jwk = _es256_jwk("k1")
    endpoint = _Jwks(tmp_path, {"k1": jwk})
    yield endpoint, key
    endpoint.stop()


def test_keys_from_a_jwks_url_are_fetched_once_and_cached(
    cws: Workspace, jwks: tuple[_Jwks, Any]
) -> None:
    endpoint, key = jwks
    cws.directory.add_user("someone")
    settings = AuthSettings.from_env(
        {"BYOD_JWT_JWKS": endpoint.url, "BYOD_JWT_JWKS_CA": str(endpoint.ca)}
    )
    assert settings.jwks_url == endpoint.url and settings.jwks_path is None
    with TestClient(create_app(cws, settings)) as client:
        for _ in range(3):
            good = client.get("/v1/me/migrations", headers=bearer(_es256(key, "k1")))
            assert good.status_code == 200, good.text
        assert endpoint.fetches == 1  # cached
        other, _ = _es256_jwk("k1")
        forged = client.get("/v1/me/migrations", headers=bearer(_es256(other, "k1")))
        assert forged.status_code == 401
        stranger = client.get("/v1/me/migrations", headers=bearer(_es256(other, "k9")))
        assert stranger.status_code == 401
        hs = client.get("/v1/me/migrations", headers=bearer(token("someone")))
        assert hs.status_code == 401
        endpoint.stop()  # the keys are cached: the identity provider may blink
        again = client.get("/v1/me/migrations", headers=bearer(_es256(key, "k1")))
        assert again.status_code == 200


def test_an_unreachable_or_untrusted_jwks_url_is_503_and_never_accepts(
    cws: Workspace, jwks: tuple[_Jwks, Any], tmp_path: Path
) -> None:
    endpoint, key = jwks
    cws.directory.add_user("someone")
    untrusted = AuthSettings(jwks_url=endpoint.url)  # the system's CAs: a self-signed cert
    with TestClient(create_app(cws, untrusted), raise_server_exceptions=False) as client:
        refused = client.get("/v1/me/migrations", headers=bearer(_es256(key, "k1")))
        assert refused.status_code == 503
        assert refused.headers["content-type"] == "application/problem+json"
        assert "cannot fetch the token keys" in refused.json()["detail"]
    endpoint.stop()
    down = AuthSettings(jwks_url=endpoint.url, jwks_ca_file=endpoint.ca)
    app = create_app(cws, down)
    with TestClient(app, raise_server_exceptions=False) as client:
        for path in ("/v1/me/migrations", "/v1/fleet/status"):
            response = client.get(path, headers=bearer(_es256(key, "k1", byod_role="admin")))
            assert response.status_code == 503, path
            assert response.json()["type"].endswith("keys-unavailable")
        page = client.get("/dashboard", cookies={"byod_token": _es256(key, "k1")})
        assert page.status_code == 503 and "cannot check tokens now" in page.text
    with pytest.raises(SettingsError, match="https"):
        AuthSettings.from_env({"BYOD_JWT_JWKS": "http://127.0.0.1/jwks.json"})
    with pytest.raises(SettingsError, match="BYOD_JWT_JWKS_CA"):
        create_app(cws, AuthSettings(jwks_url=endpoint.url, jwks_ca_file=tmp_path / "none"))


APP_ORIGIN = "https://app.example.com"


def test_cors_lets_the_configured_origin_call_the_api_and_nothing_else(api: Api) -> None:
    """With BYOD_CORS_ORIGINS, a browser page of that origin gets its preflight answered
    (no token asked for, with the usual headers) and may read the API's answers, errors
    too; another origin's preflight is a problem document; the dashboard never takes part."""
    app = create_app(api.ws, AuthSettings(secret=SECRET), HttpSettings(cors_origins=(APP_ORIGIN,)))
    preflight = {
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }
    with TestClient(app) as client:
        allowed = client.options("/v1/me/instance", headers={"Origin": APP_ORIGIN, **preflight})
        assert allowed.status_code == 204
        assert allowed.headers["access-control-allow-origin"] == APP_ORIGIN
        assert allowed.headers["access-control-allow-headers"] == "authorization, content-type"
        assert allowed.headers["access-control-allow-methods"] == "GET, POST"
        assert "access-control-allow-credentials" not in allowed.headers
        assert allowed.headers["x-content-type-options"] == "nosniff"  # the Guard's headers
        assert allowed.headers["cache-control"] == "no-store"
        for origin, asked in [
            ("https://evil.example", preflight),
            (APP_ORIGIN, {**preflight, "Access-Control-Request-Method": "DELETE"}),
            (APP_ORIGIN, {**preflight, "Access-Control-Request-Headers": "x-custom"}),
        ]:
            other = client.options("/v1/me/instance", headers={"Origin": origin, **asked})
            assert other.status_code == 403, other.text
            assert "access-control-allow-origin" not in other.headers
            assert other.headers["content-type"] == "application/problem+json"
            assert other.json()["type"] == "urn:byod:problem:origin-not-allowed"
        answer = client.get(
            "/v1/me/instance", headers={"Origin": APP_ORIGIN, **bearer(token("user_a"))}
        )
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == APP_ORIGIN
        refused = client.get("/v1/fleet/status", headers={"Origin": APP_ORIGIN})
        assert refused.status_code == 401  # readable by the page, so it can say why
        assert refused.headers["access-control-allow-origin"] == APP_ORIGIN
        foreign = client.get("/v1/fleet/status", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in foreign.headers
        page = client.get("/dashboard", headers={"Origin": APP_ORIGIN})
        assert "access-control-allow-origin" not in page.headers
    with TestClient(create_app(api.ws, AuthSettings(secret=SECRET))) as plain:
        unset = plain.options("/v1/me/instance", headers={"Origin": APP_ORIGIN, **preflight})
        assert unset.status_code == 401  # no CORS configured: an OPTIONS is a call like any
        assert "access-control-allow-origin" not in unset.headers


@pytest.mark.parametrize(
    "value",
    [
        "app.example.com",
        "https://app.example.com/path",
        "ftp://x",
        "https://a b",
        "https://x:abc",
        "https://x:99999",
        "https://user@x",
        "https://*.example.com",
        "*, https://a.example",
    ],
)
def test_a_cors_origin_that_is_not_an_origin_is_a_settings_error(value: str) -> None:
    with pytest.raises(SettingsError, match="BYOD_CORS_ORIGINS"):
        HttpSettings.from_env({"BYOD_CORS_ORIGINS": f"https://ok.example, {value}"})


def test_cors_origins_are_written_as_a_browser_sends_them() -> None:
    given = "https://App.Example.com/, http://localhost:80, https://a.example:443, http://b:3000"
    assert HttpSettings.from_env({"BYOD_CORS_ORIGINS": given}).cors_origins == (
        "https://app.example.com",
        "http://localhost",
        "https://a.example",
        "http://b:3000",
    )
    assert HttpSettings.from_env({"BYOD_CORS_ORIGINS": " * "}).cors_origins == ("*",)
