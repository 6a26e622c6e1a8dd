"""Dependencies of the routes: settings, the loaded runtime, and the API/admin key checks."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from server.errors import AuthenticationError, NotReadyError, PermissionDeniedError
from server.runtime import Runtime
from server.settings import ServerSettings


def get_settings(request: Request) -> ServerSettings:
    settings: ServerSettings = request.app.state.settings
    return settings


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime | None = request.app.state.runtime
    if runtime is None:
        raise NotReadyError("the base model is still loading; retry shortly")
    return runtime


SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


def _matches(presented: str, expected: str) -> bool:
    return secrets.compare_digest(presented.encode(), expected.encode())


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """Inference routes: the API key when one is configured (the admin key is accepted too)."""
    if settings.api_key is None:
        return
    presented = _presented_key(request)
    if presented is None:
        raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
    admin = settings.admin_key.get_secret_value() if settings.admin_key else None
    if not _matches(presented, settings.api_key.get_secret_value()) and not (
        admin and _matches(presented, admin)
    ):
        raise AuthenticationError("invalid API key")


def require_admin_key(request: Request, settings: SettingsDep) -> None:
    """Admin routes: refused outright without a configured admin key; an inference key is 403."""
    if settings.admin_key is None:
        raise PermissionDeniedError(
            "admin routes are disabled: start the server with an admin key "
            "(DELTASERVE_ADMIN_KEY or --admin-key)"
        )
    presented = _presented_key(request)
    if presented is None:
        raise AuthenticationError("missing admin key: send 'Authorization: Bearer <admin key>'")
    if _matches(presented, settings.admin_key.get_secret_value()):
        return
    if settings.api_key is not None and _matches(presented, settings.api_key.get_secret_value()):
        raise PermissionDeniedError("this route needs the admin key; the inference API key is not enough")
    raise AuthenticationError("invalid admin key")


InferenceAuth = Depends(require_api_key)
AdminAuth = Depends(require_admin_key)
