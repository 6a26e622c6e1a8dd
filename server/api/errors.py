"""The one table from typed errors (server's and deltas_store's) to HTTP status and OpenAI error bodies."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltas_store import (
    ArchitectureMismatchError,
    BaseMismatchError,
    DeltaFormatError,
    DeltaNotFoundError,
    DeltaStoreError,
    InvalidNameError,
)
from server import errors as se
from server.api.schemas import ErrorBody, ErrorDetail

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErrorSpec:
    status: int
    type: str
    code: str | None = None
    retry: bool = False  # send Retry-After


_INVALID = "invalid_request_error"

# Looked up along the exception's MRO, so the most specific class wins.
ERROR_TABLE: dict[type[Exception], ErrorSpec] = {
    se.ContextLengthError: ErrorSpec(400, _INVALID, "context_length_exceeded"),
    se.InvalidRequestError: ErrorSpec(400, _INVALID),
    se.ModelNotFoundError: ErrorSpec(404, _INVALID, "model_not_found"),
    se.NameConflictError: ErrorSpec(409, _INVALID, "name_conflict"),
    se.AuthenticationError: ErrorSpec(401, "authentication_error", "invalid_api_key"),
    se.PermissionDeniedError: ErrorSpec(403, "permission_error", "permission_denied"),
    se.PayloadTooLargeError: ErrorSpec(413, _INVALID, "payload_too_large"),
    se.QueueFullError: ErrorSpec(429, "rate_limit_error", "queue_full", retry=True),
    se.NotReadyError: ErrorSpec(503, "server_error", "not_ready", retry=True),
    se.RequestCancelledError: ErrorSpec(499, _INVALID, "cancelled"),
    InvalidNameError: ErrorSpec(400, _INVALID, "invalid_name"),
    DeltaFormatError: ErrorSpec(400, _INVALID, "invalid_delta"),
    BaseMismatchError: ErrorSpec(409, _INVALID, "base_mismatch"),
    ArchitectureMismatchError: ErrorSpec(422, _INVALID, "architecture_mismatch"),
    DeltaNotFoundError: ErrorSpec(404, _INVALID, "delta_not_found"),
    DeltaStoreError: ErrorSpec(500, "server_error", "store_error"),  # store trouble is ours, not the user's
}
_INTERNAL = ErrorSpec(500, "server_error", "internal_error")


def spec_for(exc: BaseException) -> ErrorSpec:
    for cls in type(exc).__mro__:
        spec = ERROR_TABLE.get(cls)
        if spec is not None:
            return spec
    return _INTERNAL


def error_response(
    status: int, message: str, type_: str, *, param: str | None = None, code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:  # fmt: skip
    body = ErrorBody(error=ErrorDetail(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def response_for(exc: BaseException, retry_after_s: int = 1) -> JSONResponse:
    """The HTTP answer for a typed error (also used for errors inside SSE streams)."""
    spec = spec_for(exc)
    if spec.status >= 500 and spec is not ERROR_TABLE[se.NotReadyError]:
        log.error("internal error: %s", exc, exc_info=exc)
    param = exc.param if isinstance(exc, se.ServerError) else None
    message = exc.message if isinstance(exc, se.ServerError) else str(exc) or type(exc).__name__
    headers = {"Retry-After": str(retry_after_s)} if spec.retry else None
    return error_response(spec.status, message, spec.type, param=param, code=spec.code, headers=headers)


def _retry_after(request: Request) -> int:
    settings = getattr(request.app.state, "settings", None)
    return int(getattr(settings, "retry_after_s", 1))


async def _typed_error(request: Request, exc: Exception) -> JSONResponse:
    return response_for(exc, _retry_after(request))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return error_response(
            400, f"malformed JSON body: {first.get('msg', '')}", _INVALID, code="invalid_json"
        )
    where = ".".join(loc)
    message = (
        f"{where}: {first.get('msg', 'invalid value')}" if where else str(first.get("msg", "invalid body"))
    )
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problems)"
    return error_response(422, message, _INVALID, param=where or None, code="invalid_value")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
    detail = exc.detail if isinstance(exc, StarletteHTTPException) else "internal error"
    headers = dict(exc.headers or {}) if isinstance(exc, StarletteHTTPException) else None
    type_ = _INVALID if status < 500 else "server_error"
    return error_response(status, str(detail), type_, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(se.ServerError, _typed_error)
    app.add_exception_handler(DeltaStoreError, _typed_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _typed_error)  # the shape of an unexpected 500, still logged
