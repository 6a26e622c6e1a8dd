"""Typed errors the server raises on purpose; `api/errors.py` translates them (and deltas_store's) to HTTP."""

from __future__ import annotations


class ServerError(Exception):
    """Base class of every error the server raises on purpose."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(ServerError):
    """The request is well-formed JSON but asks for something the server cannot do."""


class ContextLengthError(InvalidRequestError):
    """Prompt plus max_tokens do not fit the model's context window."""


class ModelNotFoundError(ServerError):
    """No model (base or delta) of that name is being served."""


class NameConflictError(ServerError):
    """A delta name collides with something served under that name already (the base's id)."""


class AuthenticationError(ServerError):
    """The API or admin key is missing or wrong."""


class PermissionDeniedError(ServerError):
    """The key is valid but not allowed here, or admin routes are disabled."""


class PayloadTooLargeError(ServerError):
    """An upload is over `max_upload_bytes`."""


class QueueFullError(ServerError):
    """The scheduler's queue is full; come back after `retry_after` seconds."""


class NotReadyError(ServerError):
    """The base model is not loaded yet, or the server is shutting down."""


class RequestCancelledError(ServerError):
    """The request was cancelled (client gone) before it finished."""
