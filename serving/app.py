"""The `qks-serve` HTTP app (FastAPI): routes, one-line JSON errors, API keys, metrics, access logs.

    POST /v1/tag                 images (multipart files or base64 JSON) -> qks-infer's records
    GET  /v1/labels              the label banks
    PUT  /v1/labels/{bank}       add or replace a bank while serving (admin key when keys are set)
    GET  /healthz, /readyz       alive; ready to take work (503 while draining)
    GET  /metrics                Prometheus
    GET  /openapi.json, /docs    the generated schema

Every refusal is `{"error": "one line"}` with a 4xx status (503 + Retry-After when busy or timed
out, or draining); a 5xx other than that means a defect. Access logs are one JSON object a line on
the `qks.serve.access` logger: time, request id, client, method, path, status, milliseconds,
images; never headers, so never keys.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .auth import HEADER, Keys
from .metrics import Metrics
from .requests import labels_request, tag_request
from .service import ServeError, Service

ACCESS_LOG = logging.getLogger("qks.serve.access")
ROUTES = ("/v1/tag", "/v1/labels", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs")

# -- the schema's models (documentation and schemathesis' response checks) ---------------------------

Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class Record(BaseModel):
    """One image's record, as qks-infer writes it: labels (selected, most likely first), scores
    (all_scores: every label, bank order) or error (its model output was not finite)."""

    model_config = ConfigDict(extra="forbid")
    image: str
    labels: dict[str, Probability] = None  # type: ignore[assignment]  # absent, never null
    scores: dict[str, Probability] = None  # type: ignore[assignment]
    error: str = None  # type: ignore[assignment]


class TagResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bank: str = Field(description="the bank used, or \"request\" for the request's own labels")
    labels: int = Field(ge=1, description="labels scored")
    results: list[Record]


class ErrorResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")
    error: str


class BankInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    labels: int
    key: str | None
    source: str
    names: list[str]


class LabelsResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")
    default: str
    banks: list[BankInfo]


class PutResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bank: str
    labels: int
    key: str | None
    replaced: bool


class Status(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: str
    backend: str | None = None


def _errors(*codes: int) -> dict:
    return {c: {"model": ErrorResponse, "description": desc} for c, desc in (
        (400, "bad input (one-line reason)"), (401, "missing or invalid API key"), (403, "not an admin key"),
        (404, "unknown label bank"), (409, "too many label banks"), (413, "too large (body, images, pixels, labels)"),
        (415, "unsupported content type"), (503, "busy, timed out or draining; see Retry-After")) if c in codes}


IMAGE_JSON = {"oneOf": [{"type": "string", "description": "base64 of an image file"},
                        {"type": "object", "required": ["data"], "additionalProperties": False,
                         "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 1000},
                                        "data": {"type": "string", "description": "base64 of an image file"}}}]}
OPTIONS = {"bank": {"type": "string", "minLength": 1, "description": "a bank name (GET /v1/labels)"},
           "top_k": {"type": "integer", "minimum": 1, "maximum": 100000},
           "threshold": {"type": "number", "minimum": 0, "maximum": 1,
                         "description": "default 0.5 unless top_k is given (as qks-infer)"},
           "all_scores": {"type": "boolean"}}
LABELS = {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1},
          "description": "new label text, encoded with the bundle's label graph (cached); not with bank"}
TAG_BODY = {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["images"], "additionalProperties": False,
        "properties": {"images": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}},
                       "labels": LABELS, **OPTIONS}}},
    "application/json": {"schema": {
        "type": "object", "required": ["images"], "additionalProperties": False,
        "properties": {"images": {"type": "array", "minItems": 1, "items": IMAGE_JSON}, "labels": LABELS, **OPTIONS}}}}}
PUT_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["labels"], "additionalProperties": False, "properties": {"labels": LABELS}}}}}


# -- the app ---------------------------------------------------------------------------------------------


def create_app(service: Service, keys: Keys | None = None) -> FastAPI:
    """The app over a loaded service; the service is drained and closed when the app shuts down."""
    keys = keys or Keys()
    metrics = Metrics()
    service.on_batch = metrics.on_batch
    state = {"draining": False, "tagging": 0}

    async def lifespan(app):
        yield
        state["draining"] = True
        await asyncio.get_running_loop().run_in_executor(None, service.close)

    app = FastAPI(title="qks-serve", version=_version(), lifespan=lifespan,
                  description="Open-vocabulary multi-label image tagging (qks): files in, qks-infer's records out.")
    app.state.qks = state

    def guard(request: Request, admin: bool = False) -> None:
        refused = keys.check(request.headers, admin)
        if refused:
            raise ServeError(*refused, headers={"WWW-Authenticate": f'ApiKey header="{HEADER}"'}
                             if refused[0] == 401 else None)

    async def timed(coro):
        try:
            return await asyncio.wait_for(coro, service.limits.timeout_s)
        except ServeError as e:
            if e.status == 503:
                metrics.rejected.labels("busy").inc()
            raise
        except asyncio.TimeoutError:
            metrics.rejected.labels("timeout").inc()
            raise ServeError(503, f"timed out after {service.limits.timeout_s:g} s; retry later",
                             {"Retry-After": "1"}) from None

    @app.post("/v1/tag", summary="Tag images", openapi_extra={"requestBody": TAG_BODY},
              responses={200: {"model": TagResponse, "description": "one record per image, in order"},
                         **_errors(400, 401, 404, 413, 415, 503)})
    async def tag(request: Request):
        guard(request)
        if state["draining"]:
            raise ServeError(503, "the server is shutting down", {"Retry-After": "1"})
        if state["tagging"] >= service.limits.max_in_flight:  # refused before its body is read
            metrics.rejected.labels("in_flight").inc()
            raise ServeError(503, f"server busy: {state['tagging']} requests in flight (limit "
                                  f"{service.limits.max_in_flight}); retry later", {"Retry-After": "1"})

        async def work():
            images, options = await tag_request(request, service.limits)
            request.state.images = len(images)
            return await service.tag(images, options)

        state["tagging"] += 1
        try:
            result = await timed(work())
        finally:
            state["tagging"] -= 1
        metrics.images.inc(len(result["results"]))
        return JSONResponse(result)

    @app.get("/v1/labels", summary="The label banks", responses={200: {"model": LabelsResponse}, **_errors(401)})
    async def labels(request: Request):
        guard(request)
        banks = [{"name": n, "labels": len(b), "key": b.key, "source": b.source, "names": b.names}
                 for n, b in sorted(service.banks.items())]
        return JSONResponse({"default": service.default_bank, "banks": banks})

    @app.put("/v1/labels/{bank}", summary="Add or replace a label bank", openapi_extra={"requestBody": PUT_BODY},
             responses={200: {"model": PutResponse}, **_errors(400, 401, 403, 409, 413, 415, 503)})
    async def put_labels(bank: str, request: Request):
        guard(request, admin=True)

        async def work():
            return await service.put_bank(bank, await labels_request(request, service.limits))

        new, replaced = await timed(work())
        metrics.banks.set(len(service.banks))
        return JSONResponse({"bank": bank, "labels": len(new), "key": new.key, "replaced": replaced})

    @app.get("/healthz", summary="Alive", responses={200: {"model": Status}})
    async def healthz():
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", summary="Ready to take work", responses={200: {"model": Status}, **_errors(503)})
    async def readyz():
        if state["draining"]:
            return JSONResponse({"error": "draining: the server is shutting down"}, 503, {"Retry-After": "1"})
        return JSONResponse({"status": "ready", "backend": service.backend_reason})

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        metrics.queue_images.set(service.batcher.waiting)
        metrics.banks.set(len(service.banks))
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    _errors_as_json(app)
    _openapi_with_keys(app, keys)
    app.add_middleware(AccessLog, metrics=metrics, state=state)
    return app


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("qks")
    except Exception:
        return "unknown"


def _errors_as_json(app: FastAPI) -> None:
    """Every error body is {"error": "one line"}."""

    @app.exception_handler(ServeError)
    async def serve_error(request, e: ServeError):
        return JSONResponse({"error": e.message}, e.status, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return JSONResponse({"error": str(e.detail)}, e.status_code, getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, 400)

    @app.exception_handler(Exception)
    async def defect(request, e: Exception):
        logging.getLogger("qks.serve").exception("internal error")
        return JSONResponse({"error": f"internal error ({type(e).__name__}); this is a defect"}, 500)


def _openapi_with_keys(app: FastAPI, keys: Keys) -> None:
    """The generated schema, with the API-key scheme on /v1/ routes when keys are configured."""
    base = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = base()
            if keys.enabled:
                schema.setdefault("components", {})["securitySchemes"] = {
                    "apiKey": {"type": "apiKey", "in": "header", "name": HEADER}}
                for path, ops in schema["paths"].items():
                    if path.startswith("/v1/"):
                        for op in ops.values():
                            op["security"] = [{"apiKey": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


class AccessLog:
    """ASGI middleware: a request id, the in-flight gauge, per-route metrics and one JSON log line."""

    def __init__(self, app, metrics: Metrics, state: dict):
        self.app, self.metrics, self.state = app, metrics, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:16]
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = dict(message, headers=list(message.get("headers", [])) + [(b"x-request-id", rid.encode())])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            seconds = time.perf_counter() - t0
            path = scope.get("path", "")
            route = path if path in ROUTES else "/v1/labels/{bank}" if path.startswith("/v1/labels/") else "other"
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(seconds)
            state = scope.get("state") or {}
            ACCESS_LOG.info(json.dumps({
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "request_id": rid,
                "client": (scope.get("client") or ["?"])[0], "method": scope.get("method"), "path": path,
                "status": status["code"], "ms": round(seconds * 1000, 2), "images": state.get("images")}))
