"""byod's side of Convex's wire, held against Convex's own JavaScript: the value codec
against ``convex/values`` (``convexToJson`` / ``jsonToConvex``), the HTTP client's requests
against ``ConvexHttpClient``'s, and how each failure of a deployment becomes byod's error.

The JavaScript runs in Node from ``node_modules`` (the local backend's packages, which
``make`` installs). In CI (``CI=true``) a missing ``node`` or ``node_modules`` fails these
tests; elsewhere they are skipped with the reason. The servers are real ones on 127.0.0.1,
started here.
"""

from __future__ import annotations

import functools
import http.server
import json
import logging
import math
import os
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from byod.errors import (
    BusyError,
    ByodError,
    InstanceAuthError,
    InstanceTimeoutError,
    MigrationFailedError,
    SettingsError,
    UnreachableError,
)
from byod.targets.convex_address import deployment_base
from byod.targets.convex_client import CLIENT_VERSION, ConvexClient, FunctionError
from byod.targets.convex_values import (
    MAX_INT64,
    MAX_NESTING,
    MIN_INT64,
    ConvexValueError,
    Int64,
    decode,
    encode,
)

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = Path(__file__).resolve().parent / "convex_node"
CONVEX_PACKAGE = ROOT / "node_modules" / "convex" / "package.json"
#: Shaped like a real deploy key (``deployment|secret``): the secret part must never show.
DEPLOY_KEY = "dev:byod-test-123|ZXlKMk1pSTZJbk5sWTNKbGRDMXViM1F0Y0hWaWJHbGoifQ=="
SECRET_PART = DEPLOY_KEY.partition("|")[2]
NODE_TIMEOUT = 20.0


# -- Node ----------------------------------------------------------------------------------


@functools.cache
def _node_problem() -> str | None:
    """Why Convex's JavaScript cannot be run here, or None when it can."""
    if shutil.which("node") is None:
        return "node is not installed (Node 20 runs Convex's own client for these tests)"
    if not CONVEX_PACKAGE.is_file():
        return f"{CONVEX_PACKAGE.parent} is missing: run `make unit` (it installs them)"
    return None


def require_node() -> None:
    """Fail in CI, skip elsewhere, when Node or Convex's package is missing (as
    ``tests.conftest.require_server`` does for database servers)."""
    problem = _node_problem()
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(problem)
    pytest.skip(problem)


class NodeCodec:
    """One Node process running ``convex_node/codec.mjs``: a JSON request per line in,
    a JSON answer per line out (numbers read as floats, as JavaScript reads them)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            ["node", str(NODE_DIR / "codec.mjs")],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        stdin.write(json.dumps(request) + "\n")
        stdin.flush()
        ready, _, _ = select.select([stdout], [], [], NODE_TIMEOUT)
        assert ready, "codec.mjs gave no answer"
        line = stdout.readline()
        assert line, f"codec.mjs exited ({self.process.poll()})"
        answer: dict[str, Any] = json.loads(line, parse_int=float)
        return answer

    def roundtrip(self, json_value: Any) -> dict[str, Any]:
        return self.ask({"op": "roundtrip", "json": json_value})

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def node_codec() -> Iterator[NodeCodec]:
    require_node()
    codec = NodeCodec()
    try:
        yield codec
    finally:
        codec.close()


def run_node_client(url: str, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results of ``calls`` made by ConvexHttpClient (``convex_node/http_client.mjs``)."""
    done = subprocess.run(
        ["node", str(NODE_DIR / "http_client.mjs"), url],
        cwd=ROOT,
        input=json.dumps({"key": DEPLOY_KEY, "calls": calls}),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=NODE_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results: list[dict[str, Any]] = json.loads(done.stdout, parse_int=float)
    return results


# -- comparing values ----------------------------------------------------------------------


def same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down; floats compared by their bits (so a
    NaN equals itself and -0.0 differs from 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def wire(json_value: Any) -> str:
    """JSON text with sorted fields and every number a float: two encodings are the same
    on Convex's wire when these are equal.

    Fields are compared sorted because JavaScript cannot send them in another order than
    its own: ``convexToJson`` sorts them, but a JS object lists integer-like keys ("0",
    "42") first, whatever the order they were set in, so ``{"": 1, "0": 2}`` goes out as
    ``{"0": 2, "": 1}``. byod sends them sorted; JSON gives the order no meaning."""
    return json.dumps(json.loads(json.dumps(json_value), parse_int=float), sort_keys=True)


# -- the codec against convex/values -------------------------------------------------------

FIELD_NAMES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12).filter(
    lambda name: not name.startswith("$") and name != "__proto__"
)
INT64S = st.one_of(
    st.integers(MIN_INT64, MAX_INT64),
    st.sampled_from([MIN_INT64, MIN_INT64 + 1, -1, 0, 1, 2**53 + 1, MAX_INT64 - 1, MAX_INT64]),
).map(Int64)
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(),
    st.sampled_from([math.nan, -math.nan, math.inf, -math.inf, -0.0, 0.0, 5e-324, 1e21]),
    INT64S,
    st.text(st.characters(exclude_categories=("Cs",)), max_size=20),
    st.binary(max_size=24),
)
VALUES = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(FIELD_NAMES, children, max_size=5)
    ),
    max_leaves=25,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=VALUES)
def test_encoding_is_what_convex_values_reads_and_writes(node_codec: NodeCodec, value: Any) -> None:
    """byod's encoding of any Convex value reads in ``jsonToConvex`` and comes back from
    ``convexToJson`` unchanged, and decodes to the value."""
    encoded = encode(value)
    answer = node_codec.roundtrip(encoded)
    assert answer["ok"], answer["error"]
    assert answer["same"]
    assert wire(answer["json"]) == wire(encoded)
    assert same(decode(encoded), value)
    assert same(decode(json.loads(json.dumps(encoded))), value)


@settings(max_examples=100, deadline=None)
@given(
    number=st.one_of(
        st.integers(-(2**53), 2**53),
        st.integers(0, 1023).map(lambda n: 2**n),
        st.integers(0, 1023).map(lambda n: -(2**n)),
    )
)
def test_a_python_int_is_a_js_number(node_codec: NodeCodec, number: int) -> None:
    """A plain int goes as the JS number it equals, and comes back as that float."""
    encoded = encode(number)
    assert type(encoded) is float and encoded == number
    answer = node_codec.roundtrip(encoded)
    assert answer["ok"] and answer["same"], answer
    assert decode(answer["json"]) == number


@pytest.mark.parametrize("number", [2**53 + 1, -(2**53) - 1, 2**63 + 1, 2**1024, -(2**1024)])
def test_an_int_no_float64_holds_is_refused(number: int) -> None:
    with pytest.raises(ConvexValueError, match=r"not exactly a float64.*Int64"):
        encode({"n": [number]})


#: What ``convex_node/codec.mjs`` encodes (its SAMPLES), as byod decodes it.
SAMPLES: dict[str, Any] = {
    "int64Min": Int64(MIN_INT64),
    "int64Max": Int64(MAX_INT64),
    "int64Zero": Int64(0),
    "int64MinusOne": Int64(-1),
    "int64Big": Int64(1234567890123456789),
    "negativeZero": -0.0,
    "nan": math.nan,
    "infinity": math.inf,
    "negativeInfinity": -math.inf,
    "zero": 0.0,
    "maxSafe": float(2**53 - 1),
    "twoTo60": float(2**60),
    "huge": 1e300,
    "tiny": 5e-324,
    "oneE21": 1e21,
    "third": 1 / 3,
    "emptyBytes": b"",
    "someBytes": bytes([0, 1, 2, 254, 255]),
    "emptyString": "",
    "unicode": "héllo \U0001f600 \x00 \u202e",
    "nested": {"b": [Int64(1), None, True, b"\x07"], "a": {"": -0.0, "_id": "x"}},
}


def test_node_encodings_of_js_values_decode(node_codec: NodeCodec) -> None:
    """What ``convexToJson`` writes for bigints (extremes too), ArrayBuffers, -0, NaN,
    ±Infinity and plain numbers decodes to the Python value, which encodes back to it."""
    answer = node_codec.ask({"op": "samples"})
    assert answer["ok"], answer
    assert answer["json"].keys() == SAMPLES.keys()
    for name, encoded in answer["json"].items():
        assert same(decode(encoded), SAMPLES[name]), name
        assert wire(encode(SAMPLES[name])) == wire(encoded), name


#: JSON that is not Convex's encoding of a value: jsonToConvex throws, and so does decode.
NOT_CONVEX = [
    {"$a": 1.0},
    {"$undefined": None},
    {"$set": []},
    {"$map": []},
    {"$integer": "AQAAAAAAAAA=", "b": 1.0},
    {"$integer": 5.0},
    {"$integer": "AQ=="},
    {"$integer": "AQAAAAAAAA"},
    {"$float": "AAAAAAAA8D8="},
    {"$float": "AAAA"},
    {"$bytes": "AQ"},
    {"$bytes": 1.0},
    {"é": 1.0},
    {"tab\there": 1.0},
    {"del\x7f": 1.0},
    {"x" * 1025: 1.0},
    [{"ok": {"$b": None}}],
]


@pytest.mark.parametrize("json_value", NOT_CONVEX, ids=lambda v: json.dumps(v)[:30])
def test_what_convex_values_refuses_to_read_decode_refuses(
    node_codec: NodeCodec, json_value: Any
) -> None:
    answer = node_codec.roundtrip(json_value)
    assert not answer["ok"], answer
    with pytest.raises(ConvexValueError):
        decode(json_value)


@pytest.mark.parametrize("key", ["$a", "$", "é", "a\nb", "\x7f", "x" * 1025])
def test_a_field_name_convex_refuses_is_refused(node_codec: NodeCodec, key: str) -> None:
    answer = node_codec.ask({"op": "encodeKey", "key": key})
    assert not answer["ok"], answer
    with pytest.raises(ConvexValueError, match="field name"):
        encode({"outer": {key: 1.0}})


@pytest.mark.parametrize("key", ["", "_id", " ", "~", "x" * 1024, "a.b", "constructor"])
def test_a_field_name_convex_takes_is_taken(node_codec: NodeCodec, key: str) -> None:
    answer = node_codec.ask({"op": "encodeKey", "key": key})
    assert answer["ok"], answer
    assert wire(encode({key: 1.0})) == wire(answer["json"])


def test_proto_is_refused_because_javascript_drops_it(node_codec: NodeCodec) -> None:
    """The one deliberate difference: ``jsonToConvex`` assigns ``out["__proto__"]``, which
    sets the prototype instead of a field, so the field silently vanishes. byod refuses it."""
    answer = node_codec.roundtrip({"__proto__": 1.0, "a": 2.0})
    assert answer["ok"] and answer["json"] == {"a": 2.0}
    with pytest.raises(ConvexValueError, match="__proto__"):
        encode({"__proto__": 1.0})
    with pytest.raises(ConvexValueError, match="__proto__"):
        decode({"__proto__": 1.0})


@pytest.mark.parametrize("number", [MAX_INT64 + 1, MIN_INT64 - 1, 2**100])
def test_an_int64_out_of_range_is_refused_by_both(node_codec: NodeCodec, number: int) -> None:
    answer = node_codec.ask({"op": "encodeBigInt", "decimal": str(number)})
    assert not answer["ok"] and "64-bit" in answer["error"]
    with pytest.raises(ConvexValueError, match="int64"):
        Int64(number)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({1: 2.0}, "must be a string"),
        ({"s": {1.0, 2.0}}, "set is not a Convex value"),
        ({"o": object()}, "object is not a Convex value"),
        ({"s": "\ud800"}, "lone surrogate"),
        ({"a": [1.0, {"b": Int64}]}, "type is not a Convex value"),
    ],
)
def test_what_python_has_and_convex_lacks_is_refused_with_its_place(
    value: Any, problem: str
) -> None:
    with pytest.raises(ConvexValueError, match=problem) as caught:
        encode(value)
    assert isinstance(caught.value, ValueError)


def test_nesting_is_bounded_as_convex_bounds_it() -> None:
    """Convex refuses a value nested more than 64 levels; so do encode and decode."""
    deepest: Any = 1.0
    for _ in range(MAX_NESTING):
        deepest = [deepest]
    assert decode(encode(deepest)) == deepest
    with pytest.raises(ConvexValueError, match="nested deeper"):
        encode([deepest])
    with pytest.raises(ConvexValueError, match="nested deeper"):
        decode([deepest])


def test_error_messages_name_the_place_not_the_value() -> None:
    with pytest.raises(ConvexValueError) as caught:
        encode({"rows": [{"ok": 1.0}, {"secret-value": 1.0, "$bad": 2.0}]})
    assert caught.value.path == ".rows[1]"
    assert "'$bad'" in str(caught.value) and "secret-value" not in str(caught.value)


# -- capturing and scripted HTTP servers ---------------------------------------------------


@dataclass
class Captured:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Reply:
    status: int = 200
    body: Any = field(default_factory=lambda: {"status": "success", "value": None})
    headers: dict[str, str] = field(default_factory=dict)


class Server:
    """An HTTP server on 127.0.0.1 that records each request and answers it with the next
    scripted reply (the last one again once the script is spent), or, without a script,
    a success whose value echoes the call's arguments."""

    def __init__(self, replies: list[Reply] | None = None) -> None:
        self.requests: list[Captured] = []
        self.replies = list(replies or [])
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                server.requests.append(
                    Captured(
                        "POST",
                        self.path,
                        {name.lower(): value for name, value in self.headers.items()},
                        body,
                    )
                )
                reply = server.next_reply(body)
                content = (
                    reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                )
                self.send_response(reply.status)
                for name, value in {"Content-Type": "application/json", **reply.headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=functools.partial(self.httpd.serve_forever, poll_interval=0.02), daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        return f"convex+http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def next_reply(self, body: bytes) -> Reply:
        if self.replies:
            return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        call = json.loads(body)
        args = call["args"][0] if isinstance(call["args"], list) else call["args"]
        return Reply(body={"status": "success", "value": args, "logLines": ["[LOG] called"]})

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(*replies: Reply) -> Server:
        server = Server(list(replies))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def client_for(server: Server, **options: Any) -> ConvexClient:
    options = {"timeout": 5.0, "connect_timeout": 2.0, "backoff": 0.01, **options}
    return ConvexClient(server.url, DEPLOY_KEY, **options)


# -- the client against ConvexHttpClient ---------------------------------------------------

ARGS = {
    "title": "héllo \U0001f600",
    "count": 3.0,
    "ratio": 0.1,
    "big": Int64(MAX_INT64),
    "small": Int64(MIN_INT64),
    "blob": b"\x00\xffbytes",
    "special": [math.nan, math.inf, -math.inf, -0.0],
    "nested": {"z": None, "a": [True, False, {"_id": "k"}]},
}
CALLS: list[dict[str, Any]] = [
    {"kind": "query", "path": "messages:list", "args": {}},
    {"kind": "query", "path": "messages", "args": ARGS},
    {"kind": "mutation", "path": "messages:send", "args": ARGS},
    {"kind": "action", "path": "dir/jobs:run", "args": {"n": 1.0}},
    {"kind": "function", "path": "internal/migrations:step", "args": ARGS},
    {"kind": "function", "path": "lib:f", "args": {"x": 1.0}, "componentPath": "widgets"},
]
#: Headers each HTTP library adds on its own, none of which Convex reads.
LIBRARY_HEADERS = {
    "accept",
    "accept-encoding",
    "accept-language",
    "connection",
    "content-length",
    "host",
    "sec-fetch-mode",
    "user-agent",
}


def call_with_byod(client: ConvexClient, call: dict[str, Any]) -> Any:
    args = decode(encode(call["args"]))
    if call["kind"] == "function":
        return client.function(call["path"], args, component_path=call.get("componentPath"))
    method: Callable[[str, dict[str, Any]], Any] = getattr(client, call["kind"])
    return method(call["path"], args)


def test_requests_are_convex_http_clients(serve: Callable[..., Server]) -> None:
    """The same calls, made by ConvexHttpClient with admin auth and by byod, reach the
    deployment as the same requests: path, Authorization, Content-Type and JSON body (the
    same fields, numbers the same float64s: byod writes ``3.0`` where JavaScript writes
    ``3``; :func:`wire` on field order). The Convex-Client header differs by design
    (``npm-1.48.0`` / ``byod-X.Y.Z``); each library adds its own ``user-agent``,
    ``accept``... which Convex does not read. The results agree too."""
    require_node()
    node_server, byod_server = serve(), serve()
    node_results = run_node_client(node_server.http_url, [encode_call(c) for c in CALLS])
    with client_for(byod_server) as client:
        byod_results = [call_with_byod(client, call) for call in CALLS]

    assert len(node_server.requests) == len(byod_server.requests) == len(CALLS)
    for call, node, byod in zip(CALLS, node_server.requests, byod_server.requests, strict=True):
        where = f"{call['kind']} {call['path']}"
        assert (byod.method, byod.path) == (node.method, node.path), where
        endpoint = "function" if call["kind"] == "function" else call["kind"]
        assert node.path == f"/api/{endpoint}"
        assert byod.headers["authorization"] == node.headers["authorization"], where
        assert node.headers["authorization"] == f"Convex {DEPLOY_KEY}"
        assert byod.headers["content-type"] == node.headers["content-type"] == "application/json"
        assert wire(json.loads(byod.body)) == wire(json.loads(node.body)), where
        assert node.headers["convex-client"] == "npm-1.48.0"
        assert byod.headers["convex-client"] == CLIENT_VERSION
        extra = {*byod.headers, *node.headers} - LIBRARY_HEADERS
        assert extra == {"authorization", "content-type", "convex-client"}, where

    for call, node_result, byod_result in zip(CALLS, node_results, byod_results, strict=True):
        assert node_result["ok"], node_result
        assert same(decode(node_result["json"]), byod_result), call["path"]
        assert same(byod_result, decode(encode(call["args"]))), call["path"]


def encode_call(call: dict[str, Any]) -> dict[str, Any]:
    return {**call, "args": encode(call["args"])}


def test_a_function_call_without_component_has_no_component_path(
    serve: Callable[..., Server],
) -> None:
    """ConvexHttpClient leaves ``componentPath`` out when it is undefined
    (``JSON.stringify`` drops it); so does byod, rather than sending null."""
    server = serve()
    with client_for(server) as client:
        client.function("internal/m:f")
        client.function("internal/m:f", component_path="c")
    bodies = [json.loads(request.body) for request in server.requests]
    assert list(bodies[0]) == ["path", "format", "args"]
    assert list(bodies[1]) == ["componentPath", "path", "format", "args"]
    assert bodies[0]["args"] == {} and bodies[1]["componentPath"] == "c"


def test_a_path_prefix_is_kept(serve: Callable[..., Server]) -> None:
    server = serve()
    with ConvexClient(f"{server.url}/convex/", DEPLOY_KEY) as client:
        assert client.query("q:q", {"a": 1.0}) == {"a": 1.0}
        client.function("internal/m:f")
    assert [request.path for request in server.requests] == [
        "/convex/api/query",
        "/convex/api/function",
    ]


def test_a_ca_file_that_cannot_be_read_is_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="CA file"):
        ConvexClient("convex+https://convex.example.com", DEPLOY_KEY, ssl_ca=str(tmp_path / "no"))


# -- failures and byod's errors ------------------------------------------------------------


def failure(error: str, *, status: int = 560, data: Any = None) -> Reply:
    body: dict[str, Any] = {"status": "error", "errorMessage": error, "logLines": []}
    if data is not None:
        body["errorData"] = data
    return Reply(status=status, body=body)


#: (scripted replies, byod's error, text its message holds)
FAILURES: list[tuple[str, list[Reply], type[ByodError], str]] = [
    ("function threw", [failure("Uncaught Error: no such table notes")], MigrationFailedError,
     "Uncaught Error: no such table notes"),
    ("ConvexError", [failure('{"reason":"quota"}', data={"reason": "quota"})],
     MigrationFailedError, "quota"),
    ("401", [Reply(401, {"code": "BadAdminKey", "message": "The provided admin key was invalid"})],
     InstanceAuthError, "refused the deploy key (HTTP 401: BadAdminKey"),
    ("403", [Reply(403, {"code": "Forbidden", "message": "no"})], InstanceAuthError, "HTTP 403"),
    ("500", [Reply(500, {"code": "InternalServerError", "message": "Your request couldn't be "
                         "completed. Try again later."})], UnreachableError, "HTTP 500"),
    ("502 from a proxy", [Reply(502, b"<html>Bad Gateway</html>")], UnreachableError, "HTTP 502"),
    ("400 Convex", [Reply(400, {"code": "BadJsonBody", "message": "bad"})], MigrationFailedError,
     "HTTP 400: BadJsonBody: bad"),
    ("404 not Convex", [Reply(404, b"<html>Not Found</html>")], UnreachableError,
     "is not a Convex deployment's"),
    ("redirect", [Reply(301, b"", {"Location": "https://elsewhere.convex.cloud/api/query"})],
     UnreachableError, "a redirect to 'https://elsewhere.convex.cloud/api/query'"),
    ("200 not JSON", [Reply(200, b"<html>hello</html>")], UnreachableError, "check the URL"),
    ("200 NaN literal", [Reply(200, b'{"status":"success","value":NaN}')], UnreachableError,
     "not a Convex deployment's"),
    ("200 odd status", [Reply(200, {"status": "maybe"})], UnreachableError,
     "not a Convex deployment's"),
    ("200 not a value", [Reply(200, {"status": "success", "value": {"$set": []}})],
     UnreachableError, "not a Convex value"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("replies", "error", "text"),
    [case[1:] for case in FAILURES],
    ids=[case[0] for case in FAILURES],
)
def test_a_failure_becomes_byods_error(
    serve: Callable[..., Server], replies: list[Reply], error: type[ByodError], text: str
) -> None:
    server = serve(*replies)
    with client_for(server) as client, pytest.raises(ByodError) as caught:
        client.mutation("notes:migrate", {"batch": 1.0})
    # a function that threw is a FunctionError: byod's MigrationFailedError, with its data
    assert isinstance(caught.value, error), caught.value
    assert type(caught.value) is error or type(caught.value) is FunctionError
    assert text in str(caught.value)
    assert "mutation notes:migrate" in str(caught.value)
    assert len(server.requests) == 1, "only a 429 is retried"


def test_a_function_error_in_a_2xx_is_still_an_error(serve: Callable[..., Server]) -> None:
    """ConvexHttpClient goes by the body's status, whatever the HTTP status; byod too."""
    server = serve(failure("boom", status=200))
    with client_for(server) as client, pytest.raises(MigrationFailedError, match="boom"):
        client.query("q:q")


def test_a_429_is_retried_with_backoff_then_succeeds(serve: Callable[..., Server]) -> None:
    limited = Reply(429, {"code": "RateLimited", "message": "slow down"})
    server = serve(limited, limited, Reply(200, {"status": "success", "value": 7.0}))
    with client_for(server, retries=3) as client:
        assert client.query("counter:get") == 7.0
    assert len(server.requests) == 3
    assert len({request.body for request in server.requests}) == 1


def test_retry_after_is_honoured(serve: Callable[..., Server]) -> None:
    limited = Reply(429, {"code": "RateLimited", "message": "slow down"}, {"Retry-After": "1"})
    server = serve(limited, Reply(200, {"status": "success", "value": "done"}))
    started = time.monotonic()
    with client_for(server, retries=1, backoff=0.05) as client:
        assert client.mutation("m:m") == "done"
    waited = time.monotonic() - started
    assert len(server.requests) == 2
    assert 1.0 <= waited < 10.0  # it waited for Retry-After (1 s), and not for ever


def test_a_retry_after_beyond_the_bound_gives_up_at_once(serve: Callable[..., Server]) -> None:
    server = serve(Reply(429, {"code": "RateLimited"}, {"Retry-After": "120"}))
    started = time.monotonic()
    with client_for(server, max_wait=5.0) as client, pytest.raises(BusyError) as caught:
        client.mutation("m:m")
    assert time.monotonic() - started < 4.0  # no wait up to max_wait (5 s), let alone 120 s
    assert len(server.requests) == 1
    assert "longer than 5 s" in str(caught.value) and caught.value.transient


def test_a_deployment_that_keeps_rate_limiting_is_busy(serve: Callable[..., Server]) -> None:
    server = serve(Reply(429, {"code": "RateLimited"}))
    with client_for(server, retries=2) as client, pytest.raises(BusyError, match="2 retries"):
        client.action("a:a")
    assert len(server.requests) == 3


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def test_no_answer_within_the_timeout_is_a_timeout(silent_port: int) -> None:
    client = ConvexClient(f"convex+http://127.0.0.1:{silent_port}", DEPLOY_KEY, timeout=0.3)
    started = time.monotonic()
    with client, pytest.raises(InstanceTimeoutError, match=r"no answer within 0.3 s") as caught:
        client.mutation("slow:m")
    assert time.monotonic() - started < 10.0  # ended by the timeout, not by a hang
    assert caught.value.transient


def test_a_closed_port_is_unreachable() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with (
        ConvexClient(f"convex+http://127.0.0.1:{port}", DEPLOY_KEY) as client,
        pytest.raises(UnreachableError, match="ConnectError") as caught,
    ):
        client.query("q:q")
    assert caught.value.transient


@pytest.mark.parametrize(
    ("raised", "error", "text"),
    [
        (httpx.ConnectTimeout("timed out"), UnreachableError, "no connection within 2 s"),
        (httpx.PoolTimeout("pool"), BusyError, "no free connection"),
        (httpx.WriteTimeout("write"), InstanceTimeoutError, "no answer within 5 s"),
        (httpx.RemoteProtocolError("Server disconnected"), UnreachableError, "disconnected"),
    ],
    ids=["connect timeout", "pool timeout", "write timeout", "dropped"],
)
def test_transport_failures_map_to_byods_errors(
    raised: Exception, error: type[ByodError], text: str
) -> None:
    """What a local server cannot stage reliably (a connect that hangs, a full pool) comes
    from a transport that raises httpx's own exception."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise raised

    client = ConvexClient(
        "https://happy-animal-123.convex.cloud",
        DEPLOY_KEY,
        timeout=5.0,
        connect_timeout=2.0,
        transport=httpx.MockTransport(handler),
    )
    with client, pytest.raises(ByodError) as caught:
        client.query("q:q")
    assert type(caught.value) is error and text in str(caught.value)


# -- the deploy key never shows ------------------------------------------------------------

#: (scripted replies, whether byod shows the deployment's text, scrubbed)
LEAKY: list[tuple[str, list[Reply], bool]] = [
    ("error message", [failure(f"bad key {DEPLOY_KEY} (secret {SECRET_PART})")], True),
    ("401 body", [Reply(401, {"code": "BadAdminKey", "message": f"key {DEPLOY_KEY}"})], True),
    ("500 body", [Reply(500, {"code": "Internal", "message": f"{SECRET_PART}"})], True),
    ("HTML body", [Reply(404, f"<p>{DEPLOY_KEY}</p>".encode())], True),
    ("redirect", [Reply(302, b"", {"Location": f"https://x.convex.cloud/?k={SECRET_PART}"})],
     True),
    ("log lines", [Reply(200, {"status": "success", "value": None,
                               "logLines": [f"[LOG] key is {DEPLOY_KEY}"]})], True),
    ("429 then 200", [Reply(429, {"code": "RateLimited", "message": SECRET_PART}),
                      Reply(200, {"status": "success", "value": None})], False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("replies", "echoed"), [case[1:] for case in LEAKY], ids=[case[0] for case in LEAKY]
)
def test_the_deploy_key_never_shows(
    serve: Callable[..., Server],
    caplog: pytest.LogCaptureFixture,
    replies: list[Reply],
    echoed: bool,
) -> None:
    """Not in byod's message, nor its chained exceptions' traceback, nor the client's repr,
    nor any log line (httpx's and httpcore's debug lines included), even when the
    deployment echoes it back.

    One exception, outside byod: httpcore's DEBUG line for a response lists the response's
    headers as received, so a deployment that echoes the key in a header (the redirect
    case) has it there; the request's headers, the key's own way out, never are."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="byod")
    # the CLI's own logging (set up by other tests in this process) stops byod's records
    # from reaching the root logger: hear them where they are logged
    byod_log = logging.getLogger("byod")
    byod_log.addHandler(caplog.handler)
    server = serve(*replies)
    shown: list[str] = []
    try:
        with client_for(server) as client:
            shown.append(repr(client))
            try:
                client.mutation("m:m")
            except ByodError as exc:
                shown += [str(exc), repr(exc), exc.hint, "".join(traceback.format_exception(exc))]
    finally:
        byod_log.removeHandler(caplog.handler)
    echoed_in_headers = any(reply.headers for reply in replies)
    shown += [
        record.getMessage()
        for record in caplog.records
        if not (echoed_in_headers and record.getMessage().startswith("receive_response_headers"))
    ]
    assert any(record.name.startswith("httpcore") for record in caplog.records)
    assert server.requests[0].headers["authorization"] == f"Convex {DEPLOY_KEY}"
    for text in shown:
        assert SECRET_PART not in text and DEPLOY_KEY not in text
    assert ("[deploy key]" in "".join(shown)) == echoed


def test_a_malformed_key_is_refused_without_showing_it() -> None:
    for key in ["", "has space|secretsecret", "new\nline|secretsecret", "nön-ascii|secret"]:
        with pytest.raises(SettingsError) as caught:
            ConvexClient("https://happy-animal-123.convex.cloud", key)
        assert "secret" not in str(caught.value)


def test_arguments_must_be_a_dict_of_convex_values(serve: Callable[..., Server]) -> None:
    server = serve()
    with client_for(server) as client:
        with pytest.raises(ConvexValueError, match="must be a dict"):
            client.query("q:q", [1.0])  # type: ignore[arg-type]
        with pytest.raises(ConvexValueError, match="int64"):
            client.query("q:q", {"n": Int64(2**64)})
        with pytest.raises(ConvexValueError, match="not exactly a float64"):
            client.query("q:q", {"n": 2**62 + 1})
        with pytest.raises(ValueError, match="function path"):
            client.query("bad path", {})
    assert server.requests == []


# -- deployment URLs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("https://happy-animal-123.convex.cloud", "https://happy-animal-123.convex.cloud"),
        ("HTTPS://Happy-Animal-123.convex.cloud/", "https://happy-animal-123.convex.cloud"),
        ("https://happy-animal-123.eu-west-1.convex.cloud", None),
        ("https://happy-animal-123.convex.cloud:443", "https://happy-animal-123.convex.cloud"),
        ("convex+http://127.0.0.1:3210", "http://127.0.0.1:3210"),
        ("convex+http://localhost:3210/", "http://localhost:3210"),
        ("convex+https://convex.example.com", "https://convex.example.com"),
        ("convex+https://convex.example.com:443/", "https://convex.example.com"),
        (
            "convex+https://example.com:8443/convex/api-v1/",
            "https://example.com:8443/convex/api-v1",
        ),
        ("convex+http://[::1]:3210", "http://[::1]:3210"),
        ("CONVEX+HTTP://Box.Local:80/p", "http://box.local/p"),
    ],
)
def test_accepted_deployment_urls(url: str, base: str | None) -> None:
    assert deployment_base(url) == (base or url)
    assert deployment_base(f"convex+{deployment_base(url)}") == deployment_base(url)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("", "is empty"),
        ("happy-animal-123.convex.cloud", "must be https://NAME.convex.cloud"),
        ("http://happy-animal-123.convex.cloud", "must be https://NAME.convex.cloud"),
        ("postgresql://u@h/db", "must be https://NAME.convex.cloud"),
        ("https://example.com", "is not NAME.convex.cloud"),
        ("https://convex.cloud", "is not NAME.convex.cloud"),
        ("https://happy-animal-123.convex.site", "serves HTTP actions"),
        ("https://happy-animal-123.convex.cloud/api", "has no port or path"),
        ("https://happy-animal-123.convex.cloud:8443", "has no port or path"),
        ("https://admin:hunter2@happy-animal-123.convex.cloud", "user or password"),
        ("convex+https://key@example.com", "user or password"),
        ("https://happy-animal-123.convex.cloud?adminKey=x", "query"),
        ("convex+https://example.com/#frag", "fragment"),
        ("convex+https://exa mple.com", "spaces or control"),
        ("convex+https://example.com/\x1b[31m", "spaces or control"),
        ("convex+https://exämple.com", "non-ASCII"),
        ("convex+https://example.com:99999", "malformed port"),
        ("convex+https://example.com:0", "port 0"),
        ("convex+https://example.com:http", "malformed port"),
        ("convex+https://[::zz]:1", "IPv6"),
        ("convex+https://-bad-.com", "no valid host"),
        ("convex+https:///path", "no valid host"),
        ("convex+https://example.com/a/../b", "path"),
        ("convex+https://example.com/a\\b", "path"),
        ("convex+ftp://example.com", "must be https://NAME.convex.cloud"),
    ],
)
def test_refused_deployment_urls(url: str, problem: str) -> None:
    with pytest.raises(SettingsError, match=problem.replace("?", r"\?")) as caught:
        deployment_base(url)
    assert "hunter2" not in str(caught.value) and "adminKey=x" not in str(caught.value)
