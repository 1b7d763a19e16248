"""A Convex deployment's functions over HTTP, called as Convex's own ``ConvexHttpClient``
calls them, with the deployment's deploy key (admin access, internal functions too).

Each call is one ``POST`` of ``{"path", "format": "convex_encoded_json", "args"}`` to
``{base}/api/query``, ``/api/mutation`` or ``/api/action`` (``args`` a one-item list), or
of ``{"componentPath"?, "path", "format", "args"}`` to ``{base}/api/function`` (``args``
the object itself; any kind of function, internal ones included). The headers are
``Content-Type: application/json``, ``Authorization: Convex <deploy key>`` and
``Convex-Client: byod-<version>``: Convex reads that header as ``{client}-{semver}`` and
refuses a request whose header it cannot parse, so the version sent is always three
numbers. byod's contract tests compare these requests with ``ConvexHttpClient``'s.

What goes wrong becomes byod's errors, none of which ever holds the deploy key:

* the function threw (HTTP 560): :class:`MigrationFailedError` with its ``errorMessage``;
  another 4xx answered by Convex (``{code, message}``) is the call's mistake too;
* 401 or 403: :class:`InstanceAuthError` (the deployment refused the key);
* no connection (refused, DNS, the connect timeout), a 404 of Convex's (no deployment there), a 5xx,
  a redirect, or an answer that is not Convex's: :class:`UnreachableError`;
* no answer within the read (or write) timeout: :class:`InstanceTimeoutError` (a mutation
  or action may still finish on the deployment);
* 429: retried here, waiting what ``Retry-After`` asks or an exponential backoff with
  jitter, at most ``retries`` times and ``max_wait`` seconds each, then :class:`BusyError`.
  Nothing else is retried: a mutation that may have run is never sent twice.
"""

from __future__ import annotations

import json
import logging
import random
import re
import ssl
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import httpx

from byod.errors import (
    BusyError,
    InstanceAuthError,
    InstanceTimeoutError,
    MigrationFailedError,
    SettingsError,
    UnreachableError,
)
from byod.targets.convex_address import deployment_base
from byod.targets.convex_values import ConvexValueError, Value, decode
from byod.targets.convex_wire import (
    CLIENT_VERSION,
    FunctionError,
    checked_path,
    encoded_args,
    no_constant,
    retry_after,
)
from byod.text import printable

__all__ = ["ConvexClient", "FunctionError", "deployment_base"]

log = logging.getLogger(__name__)

#: Status of a function that threw (``STATUS_CODE_UDF_FAILED`` of ``ConvexHttpClient``).
FUNCTION_FAILED = 560
_KEY = re.compile(r"[!-~]{1,4096}")
#: How much of an answer that is not Convex's is shown in a message.
_SHOWN = 200
_LONGEST_MESSAGE = 4000


class ConvexClient:
    """Calls one Convex deployment's functions with its deploy key, on a pool of kept-alive
    connections (thread-safe; close it, or use it as a context manager).

    ``url`` is a deployment URL as :func:`deployment_base` accepts it. ``timeout`` bounds
    each read and write (how long a function may take to answer), ``connect_timeout``
    each connect and each wait for a free connection of the pool. A 429 is retried at
    most ``retries`` times; each wait is ``Retry-After`` (plus up to ``backoff`` seconds of
    jitter) when the deployment sends one, else ``backoff * 2**n`` halved by jitter; a
    deployment that asks for more than ``max_wait`` seconds gets a :class:`BusyError` at
    once. ``ssl_ca`` is a CA file to verify the deployment's certificate with instead of
    the system's (a self-hosted deployment with its own CA). Proxy variables and
    ``.netrc`` of the environment are ignored. ``transport`` replaces httpx's (tests).
    ``address``, given, is the IP every call connects to (the one the instance policy
    checked); the URL's host name is still the ``Host`` header and the name the TLS
    certificate is checked against (SNI), so a second DNS answer cannot move a call.
    """

    def __init__(
        self,
        url: str,
        deploy_key: str,
        *,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_wait: float = 30.0,
        max_connections: int = 10,
        ssl_ca: str | None = None,
        transport: httpx.BaseTransport | None = None,
        address: str | None = None,
    ) -> None:
        self.base = deployment_base(url)
        if not _KEY.fullmatch(deploy_key):
            raise SettingsError(
                "the Convex deploy key must be printable ASCII without spaces "
                "(copy it again from the Convex dashboard)"
            )
        if retries < 0 or backoff < 0 or max_wait < 0:
            raise ValueError("retries, backoff and max_wait must not be negative")
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.backoff = backoff
        self.max_wait = max_wait
        verify: ssl.SSLContext | bool = True
        if ssl_ca:
            try:
                verify = ssl.create_default_context(cafile=ssl_ca)
            except (OSError, ssl.SSLError) as exc:
                raise SettingsError(
                    f"the CA file {ssl_ca} cannot be used: {type(exc).__name__}"
                ) from None
        _, _, token = deploy_key.partition("|")
        self._secrets = tuple(
            secret for secret in (deploy_key, token) if len(secret) >= 8 or secret == deploy_key
        )
        headers = {
            "Content-Type": "application/json",
            "Convex-Client": CLIENT_VERSION,
            "Authorization": f"Convex {deploy_key}",
            "User-Agent": f"byod/{CLIENT_VERSION.removeprefix('byod-')}",
        }
        connect_to, self._extensions = self.base, {}
        if address is not None:  # connect to the checked address; the name for Host and TLS
            parts = urlsplit(self.base)
            ip = f"[{address}]" if ":" in address else address
            netloc = ip + (f":{parts.port}" if parts.port else "")
            connect_to = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
            headers["Host"] = parts.netloc
            self._extensions = {"sni_hostname": parts.hostname or ""}
        self._http = httpx.Client(
            base_url=connect_to,
            headers=headers,
            timeout=httpx.Timeout(
                connect=connect_timeout, read=timeout, write=timeout, pool=connect_timeout
            ),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            follow_redirects=False,
            trust_env=False,
            verify=verify,
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"ConvexClient({self.base!r})"

    def __enter__(self) -> ConvexClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections; the client cannot be used afterwards."""
        self._http.close()

    def query(
        self, path: str, args: Mapping[str, Value] | None = None, *, timeout: float | None = None
    ) -> Value:
        """Run public query ``path`` (``"module:name"``) with ``args``; its decoded result."""
        return self._udf("query", path, args, timeout)

    def mutation(
        self, path: str, args: Mapping[str, Value] | None = None, *, timeout: float | None = None
    ) -> Value:
        """Run public mutation ``path`` with ``args`` (one transaction); its decoded result."""
        return self._udf("mutation", path, args, timeout)

    def action(
        self, path: str, args: Mapping[str, Value] | None = None, *, timeout: float | None = None
    ) -> Value:
        """Run public action ``path`` with ``args``; its decoded result."""
        return self._udf("action", path, args, timeout)

    def function(
        self,
        path: str,
        args: Mapping[str, Value] | None = None,
        component_path: str | None = None,
        *,
        timeout: float | None = None,
    ) -> Value:
        """Run function ``path`` of any kind, internal ones too (what ``npx convex run``
        does), in component ``component_path`` (None: the app itself); its decoded result.

        ``timeout``, given, bounds this call's read and write instead of the client's."""
        body: dict[str, object] = {}
        if component_path is not None:
            body["componentPath"] = checked_path(component_path, "component path")
        body.update(
            path=checked_path(path, "function path"),
            format="convex_encoded_json",
            args=encoded_args(args),
        )
        return self._call("function", path, "/api/function", body, timeout)

    def _udf(
        self, kind: str, path: str, args: Mapping[str, Value] | None, timeout: float | None
    ) -> Value:
        body: dict[str, object] = {
            "path": checked_path(path, "function path"),
            "format": "convex_encoded_json",
            "args": [encoded_args(args)],
        }
        return self._call(kind, path, f"/api/{kind}", body, timeout)

    def _call(
        self,
        kind: str,
        path: str,
        endpoint: str,
        body: dict[str, object],
        timeout: float | None = None,
    ) -> Value:
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        response = self._post(kind, path, endpoint, content.encode("utf-8"), timeout)
        return self._result(kind, path, response)

    def scrub(self, text: str) -> str:
        """``text`` with the deploy key (and its token part) replaced, and cut short."""
        for secret in self._secrets:
            text = text.replace(secret, "[deploy key]")
        return text[:_LONGEST_MESSAGE]

    def _where(self, kind: str, path: str) -> str:
        return f"Convex {kind} {path} on {self.base}"

    def _post(
        self, kind: str, path: str, endpoint: str, content: bytes, timeout: float | None
    ) -> httpx.Response:
        where = self._where(kind, path)
        waited = self.timeout if timeout is None else timeout
        bound = httpx.Timeout(
            connect=self.connect_timeout, read=waited, write=waited, pool=self.connect_timeout
        )
        for attempt in range(self.retries + 1):
            try:
                response = self._http.post(
                    endpoint, content=content, timeout=bound, extensions=self._extensions
                )
            except httpx.ConnectTimeout as exc:
                raise UnreachableError(
                    f"{where}: no connection within {self.connect_timeout:g} s"
                ) from exc
            except httpx.PoolTimeout as exc:
                raise BusyError(
                    f"{where}: no free connection within {self.connect_timeout:g} s "
                    "(every connection of this client is busy)"
                ) from exc
            except httpx.TimeoutException as exc:
                raise InstanceTimeoutError(
                    f"{where}: no answer within {waited:g} s; the deployment may "
                    "still finish the call"
                ) from exc
            except httpx.RequestError as exc:
                raise UnreachableError(f"{where}: {self._describe(exc)}") from exc
            if response.status_code != httpx.codes.TOO_MANY_REQUESTS:
                return response
            delay = self._delay(response, attempt)
            if attempt == self.retries or delay is None:
                raise BusyError(
                    f"{where}: the deployment is rate limiting byod (HTTP 429)"
                    + (
                        f" and asks to wait longer than {self.max_wait:g} s"
                        if delay is None
                        else f" after {self.retries} retries"
                    ),
                    hint="Wait, then run again; fewer runs at once on this deployment help.",
                )
            log.warning(
                "%s: rate limited (HTTP 429), retry %d of %d in %.2f s",
                where,
                attempt + 1,
                self.retries,
                delay,
            )
            time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _describe(self, exc: Exception) -> str:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return self.scrub(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)

    def _delay(self, response: httpx.Response, attempt: int) -> float | None:
        asked = retry_after(response.headers.get("Retry-After"))
        if asked is not None:
            if asked > self.max_wait:
                return None
            return asked + random.uniform(0.0, self.backoff)
        ceiling = min(self.max_wait, self.backoff * 2.0**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _result(self, kind: str, path: str, response: httpx.Response) -> Value:
        where = self._where(kind, path)
        status = response.status_code
        if status in (httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN):
            raise InstanceAuthError(
                f"{where}: the deployment refused the deploy key (HTTP {status}"
                f"{self._error_detail(response)})"
            )
        if not (response.is_success or status == FUNCTION_FAILED):
            self._failed(where, response)
        answer = self._json(where, response)
        if not isinstance(answer, dict):
            self._not_convex(where, response)
        for line in answer.get("logLines") or []:
            log.debug("%s: %s", where, printable(self.scrub(str(line))))
        if answer.get("status") == "success" and "value" in answer:
            try:
                return decode(answer["value"])
            except ConvexValueError as exc:
                raise UnreachableError(
                    f"{where}: the answer is not a Convex value: {self.scrub(str(exc))}"
                ) from None
        if answer.get("status") == "error":
            message = answer.get("errorMessage")
            try:
                data = decode(answer["errorData"]) if "errorData" in answer else None
            except ConvexValueError:
                data = None
            raise FunctionError(
                f"{where} failed: "
                + self.scrub(message if isinstance(message, str) else "(no error message)"),
                data=data,
            )
        self._not_convex(where, response)

    def _failed(self, where: str, response: httpx.Response) -> NoReturn:
        status = response.status_code
        detail = self._error_detail(response)
        if response.is_redirect:
            location = self.scrub(response.headers.get("Location", ""))[:_SHOWN]
            raise UnreachableError(
                f"{where}: answered HTTP {status}, a redirect to {location!r}: "
                "connect the user with that deployment URL"
            )
        if status >= 500:
            raise UnreachableError(f"{where}: the deployment failed (HTTP {status}{detail})")
        if status == httpx.codes.NOT_FOUND and detail:
            raise UnreachableError(
                f"{where}: no deployment answers at this URL (HTTP 404{detail}): it was "
                "deleted, or the URL is wrong"
            )
        if detail:
            raise MigrationFailedError(f"{where}: refused (HTTP {status}{detail})")
        self._not_convex(where, response)

    def _error_detail(self, response: httpx.Response) -> str:
        """``: code: message`` of Convex's error body, or "" when it is not one."""
        try:
            body = json.loads(response.content)
        except (ValueError, RecursionError):
            return ""
        if not isinstance(body, dict):
            return ""
        code, message = body.get("code"), body.get("message")
        shown = ": ".join(str(part) for part in (code, message) if isinstance(part, str))
        return f": {self.scrub(shown)}" if shown else ""

    def _json(self, where: str, response: httpx.Response) -> Any:
        try:
            return json.loads(response.content, parse_constant=no_constant)
        except (ValueError, RecursionError):
            self._not_convex(where, response)

    def _not_convex(self, where: str, response: httpx.Response) -> NoReturn:
        shown = self.scrub(response.text)[:_SHOWN]
        raise UnreachableError(
            f"{where}: the answer (HTTP {response.status_code}) is not a Convex deployment's: "
            f"{shown!r}; check the URL"
        )
