"""Typed client errors: the server's OpenAI-shaped error bodies translated back, in one status table."""

from __future__ import annotations


class DeltaserveError(Exception):
    """Base class of every error the deltaserve client raises on purpose."""


class APIConnectionError(DeltaserveError):
    """The server could not be reached, or the connection broke before a full answer arrived."""


class APIResponseValidationError(DeltaserveError):
    """The server answered 2xx with a body that is not the expected JSON shape."""


class APIError(DeltaserveError):
    """The server answered with an error status and (usually) an OpenAI-shaped error body.

    Example:
        >>> try:
        ...     client.get_delta("missing")
        ... except NotFoundError as exc:
        ...     print(exc.status_code, exc.message)
        404 delta 'missing' not found
    """

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.request_id = request_id
        # Seconds the server asked us to wait (429/503 with Retry-After); None when it did not say.
        self.retry_after = retry_after

    def __str__(self) -> str:
        details = ", ".join(
            f"{label}={value}"
            for label, value in (("type", self.type), ("param", self.param), ("code", self.code))
            if value
        )
        suffix = f" ({details})" if details else ""
        return f"HTTP {self.status_code}: {self.message}{suffix}"


class BadRequestError(APIError):
    """400 or 422: the request (or the uploaded delta) was rejected as invalid."""


class AuthenticationError(APIError):
    """401: the API key is missing or wrong."""


class PermissionDeniedError(APIError):
    """403: the key is valid but not allowed here (e.g. an inference key on an admin route)."""


class NotFoundError(APIError):
    """404: unknown model or delta."""


class ConflictError(APIError):
    """409: the delta conflicts with the server's state (name taken, made for another base)."""


class PayloadTooLargeError(APIError):
    """413: the uploaded body is over the server's size limit."""


class RateLimitError(APIError):
    """429: the server's queue is full; `retry_after` says when to come back."""


class ServiceUnavailableError(APIError):
    """503: the server is not ready or is overloaded; `retry_after` says when to come back."""


class InternalServerError(APIError):
    """Any other 5xx: a bug or failure on the server side."""


# The one translation table from HTTP status back to a typed error (the server has its mirror image).
STATUS_ERRORS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: BadRequestError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def error_class_for(status_code: int) -> type[APIError]:
    """The error class for an HTTP error status: the table first, then by status family."""
    if status_code in STATUS_ERRORS:
        return STATUS_ERRORS[status_code]
    if status_code >= 500:
        return InternalServerError
    return APIError
