"""The HTTP service: the caller's own instance and history, and the operators' fleet view.

Every route reads through the core (``commands``, ``controlplane``, ``fleet``); none
holds migration logic of its own. Users see only their own data; operators
(``byod_role: admin``) see the fleet.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from byod import commands, metrics
from byod.api import problems
from byod.api.auth import Authenticator, AuthSettings, Principal
from byod.api.background import BackgroundRuns
from byod.api.dashboard import STYLE, install_dashboard
from byod.api.guard import Guard, HttpSettings, content_security_policy
from byod.api.models import (
    FleetRunRequest,
    FleetStatusOut,
    HistoryPage,
    InstanceOut,
    PendingOut,
    PendingStep,
    Problem,
    RunOut,
    RunStarted,
)
from byod.api.monitoring import CONTENT_TYPE, exposition
from byod.controlplane import User
from byod.errors import (
    ForbiddenError,
    InputError,
    NotConnectedError,
    NotFoundError,
    SettingsError,
    UnavailableError,
)
from byod.spec import FleetOptions, Selection, default_concurrency
from byod.workspace import Workspace

__all__ = ["create_app", "openapi_document"]

_PROBLEM_CONTENT = {
    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
}
_ERROR_TEXT = {
    400: "a malformed request (e.g. a Content-Length that is not a number)",
    401: "no valid token",
    403: "operators only",
    404: "not found: the caller (or the user, or the run) is unknown, or not connected",
    409: "a run is already under way",
    413: "the request body is larger than BYOD_API_MAX_BODY (any request's body)",
    422: "invalid request: a parameter or the body is not what the document says",
    503: "the control plane, the task-queue broker or the token keys are unavailable",
}
#: what any API call may answer: a bad header, no token, a body too large, a server
#: without its control plane or keys
_ANY = (400, 401, 413, 503)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The problem responses of a route: those of any call and ``statuses``."""
    return {
        status: {"model": Problem, "description": _ERROR_TEXT[status]}
        for status in sorted({*_ANY, *statuses})
    }


#: OpenAPI links: from an answer that names a run or a user to the operation that reads
#: it (what a generated client, or a stateful checker, follows)
_LINKS: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {
    ("/v1/me/migrations/run", "post", "202"): {
        "MyRun": {
            "operationId": "my_run",
            "parameters": {"run_id": "$response.body#/run_id"},
            "description": "the run just started, as its caller follows it",
        }
    },
    ("/v1/fleet/runs", "post", "202"): {
        "FleetRun": {
            "operationId": "fleet_run",
            "parameters": {"run_id": "$response.body#/run_id"},
            "description": "the fleet run just started, as an operator follows it",
        }
    },
    ("/v1/me/instance", "get", "200"): {
        "UserHistory": {
            "operationId": "user_history",
            "parameters": {"user": "$response.body#/clerk_id"},
            "description": "this user's history, as an operator reads it",
        }
    },
    ("/v1/fleet/status", "get", "200"): {
        "FailedUserHistory": {
            "operationId": "user_history",
            "parameters": {"user": "$response.body#/recent_failures/0/clerk_id"},
            "description": "the history of the user the latest failure hit",
        }
    },
}


def _workspace(request: Request) -> Workspace:
    ws: Workspace = request.app.state.ws
    return ws


_bearer = HTTPBearer(auto_error=False, description="A JWT; `sub` is the user's clerk id.")


def _caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None,
) -> Principal:
    principal = getattr(request.state, "principal", None)
    if isinstance(principal, Principal):  # the Guard authenticated it before any body
        return principal
    authenticator: Authenticator = request.app.state.authenticator
    if credentials is None:
        return authenticator.authenticate(request.headers.get("authorization"))
    return authenticator.verify(credentials.credentials)


def _operator(request: Request, principal: Annotated[Principal, Depends(_caller)]) -> Principal:
    if not principal.admin:
        authenticator: Authenticator = request.app.state.authenticator
        raise ForbiddenError(f"operators only ({authenticator.operator_rule})")
    return principal


Ws = Annotated[Workspace, Depends(_workspace)]
Caller = Annotated[Principal, Depends(_caller)]
Operator = Annotated[Principal, Depends(_operator)]
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=10**9)]
router = APIRouter()


def _me(ws: Workspace, principal: Principal) -> User:
    """The caller: the user whose clerk id is the token's subject, byte for byte (never
    a byod id, never trimmed or normalised)."""
    return commands.caller(ws, principal.clerk_id)


@router.get("/v1/me/instance", tags=["me"], responses=_errors(404))
def my_instance(ws: Ws, principal: Caller) -> InstanceOut:
    """Where the caller's database stands."""
    view = commands.instance(ws, _me(ws, principal))
    return InstanceOut.model_validate(
        {
            "user_id": view.user.id,
            "clerk_id": view.user.clerk_id,
            "connection_status": view.config.connection_status,
            "schema_version": view.config.schema_version,
            "head_version": view.head,
            "pending": view.pending,
            "last_error": view.config.last_error,
        }
    )


@router.get("/v1/me/migrations", tags=["me"], responses=_errors(404, 422))
def my_history(ws: Ws, principal: Caller, limit: Limit = 50, offset: Offset = 0) -> HistoryPage:
    """The caller's migration history, newest first."""
    rows = commands.history_of(ws, _me(ws, principal).id, limit=limit, offset=offset)
    return HistoryPage.of(rows, limit, offset)


@router.get("/v1/me/migrations/pending", tags=["me"], responses=_errors(404))
def my_pending(ws: Ws, principal: Caller) -> PendingOut:
    """How many migrations the caller's database still needs, and which (none, with
    ``connected`` false, while the caller has no database connected)."""
    me = _me(ws, principal)
    try:
        pending = commands.pending_migrations(ws, me)
    except NotConnectedError:
        return PendingOut(count=0, migrations=[], connected=False)
    steps = [
        PendingStep(id=m.id, version=m.version, name=m.name, description=m.description)
        for m in pending
    ]
    return PendingOut(count=len(steps), migrations=steps, connected=True)


@router.post("/v1/me/migrations/run", status_code=202, tags=["me"], responses=_errors(404, 409))
def run_mine(request: Request, ws: Ws, principal: Caller) -> RunStarted:
    """Start a run for the caller's own database (409 while one is under way)."""
    user = _me(ws, principal)
    commands.instance(ws, user)  # NotConnectedError: 404
    runs: BackgroundRuns = request.app.state.runs
    return RunStarted(run_id=runs.start_for_user(user, started_by=_started_by(principal)))


@router.get("/v1/runs/{run_id}", tags=["me"], responses=_errors(404, 422))
def my_run(ws: Ws, principal: Caller, run_id: str) -> RunOut:
    """A run the caller started for their own database (``POST /v1/me/migrations/run``
    with this token's subject); any other run, even one of their database started by an
    operator, is 404."""
    user = _me(ws, principal)
    mine = f"no run {run_id!r} of yours"  # the same whether it exists or not
    details = _run_or_404(ws, run_id, mine)
    run = details.run
    if run.spec.selection.users != (user.id,) or run.started_by != _started_by(principal):
        raise NotFoundError(mine)
    return RunOut.of(run, details.rows_done, details.rows_total)


@router.get("/v1/fleet/status", tags=["operators"], responses=_errors(403))
def fleet(ws: Ws, principal: Operator) -> FleetStatusOut:
    """Users per version and connection status, recent failures."""
    return FleetStatusOut.of(commands.status(ws))


@router.post(
    "/v1/fleet/runs", status_code=202, tags=["operators"], responses=_errors(403, 409, 422)
)
def start_fleet_run(
    request: Request, ws: Ws, principal: Operator, body: FleetRunRequest
) -> RunStarted:
    """Start a fleet run with these options (``distributed``: on task-queue workers)."""
    options = FleetOptions(
        concurrency=body.concurrency or default_concurrency(body.distributed),
        retries=body.retries,
        timeout=body.timeout,
        canary=body.canary,
        max_failure_ratio=body.max_failure_ratio,
    )
    selection = Selection(only_version=body.only_version, limit=body.limit)
    if body.distributed:
        try:
            run_id = commands.migrate_distributed(
                ws,
                options=options,
                selection=selection,
                per_host=body.per_host,
                started_by=_started_by(principal),
            )
        except SettingsError as exc:  # the server's set-up, not the caller's request
            raise UnavailableError(exc.message) from exc
        metrics.RUNS_STARTED.labels("distributed").inc()
        return RunStarted(run_id=run_id)
    runs: BackgroundRuns = request.app.state.runs
    return RunStarted(
        run_id=runs.start_fleet(
            options, selection, started_by=_started_by(principal), rehearse=body.rehearse
        )
    )


@router.get("/v1/fleet/runs/{run_id}", tags=["operators"], responses=_errors(403, 404, 422))
def fleet_run(ws: Ws, principal: Operator, run_id: str) -> RunOut:
    """A fleet run's progress: done, failed, remaining."""
    details = _run_or_404(ws, run_id)
    return RunOut.of(details.run, details.rows_done, details.rows_total)


@router.get("/metrics", tags=["operators"], include_in_schema=False)
def prometheus_metrics(ws: Ws, principal: Operator) -> Response:
    """Prometheus metrics (an operator's token, as for every operator route)."""
    return Response(exposition(ws), media_type=CONTENT_TYPE)


@router.get(
    "/v1/users/{user:path}/migrations", tags=["operators"], responses=_errors(403, 404, 422)
)
def user_history(
    ws: Ws, principal: Operator, user: str, limit: Limit = 50, offset: Offset = 0
) -> HistoryPage:
    """Any user's history (id or clerk id), newest first."""
    _, rows = commands.user_history(ws, user, limit=limit, offset=offset)
    return HistoryPage.of(rows, limit, offset)


def create_app(ws: Workspace, auth: AuthSettings, http: HttpSettings | None = None) -> FastAPI:
    """The ASGI app on one workspace (control plane, migrations, key).

    ``http`` (default: 64 KiB bodies, no trusted proxy) is applied by the app itself, so
    any ASGI server gives the same answers; ``byod serve`` turns uvicorn's own
    forwarded-header handling off.
    """
    http = HttpSettings() if http is None else http
    commands.check_service(ws)
    authenticator = Authenticator(auth)
    app = _routes()
    app.state.ws = ws
    app.state.authenticator = authenticator
    app.state.runs = BackgroundRuns(ws)
    problems.install(app)
    app.add_middleware(
        Guard,
        authenticator=authenticator,
        settings=http,
        dashboard_csp=content_security_policy(STYLE),
    )
    if http.forwarded_allow_ips:  # outermost: the Guard sees the real scheme and client
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=list(http.forwarded_allow_ips))
    return app


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document ``create_app``'s app serves at ``/openapi.json`` (no workspace
    needed: what a client generator reads)."""
    return _routes().openapi()


def _routes() -> FastAPI:
    """The app's routes and document, without a workspace, keys or middleware."""
    app = FastAPI(
        title="byod",
        version="0.1.0",
        description="Schema migrations of users' own databases: status and runs.",
        generate_unique_id_function=lambda route: route.name,
    )
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.include_router(router)
    install_dashboard(app)
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, saying that every error is a problem document."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        for operation in (op for path in schema["paths"].values() for op in path.values()):
            for status, response in operation["responses"].items():
                if status[0] in "45":
                    response["content"] = _PROBLEM_CONTENT
        for (path, method, status), links in _LINKS.items():
            schema["paths"][path][method]["responses"][status]["links"] = links
        schema["components"]["schemas"].pop("HTTPValidationError", None)
        schema["components"]["schemas"].pop("ValidationError", None)
        app.openapi_schema = schema
    return app.openapi_schema


def _started_by(principal: Principal) -> str:
    """Who a run started over HTTP was started by: the token's subject."""
    return f"{principal.clerk_id} (token)"


def _run_or_404(ws: Workspace, run_id: str, missing: str | None = None) -> commands.RunDetails:
    try:
        return commands.show_run(ws, run_id)
    except InputError as exc:
        raise NotFoundError(missing or f"no run {run_id!r}") from exc
