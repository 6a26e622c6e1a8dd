"""`/v1/deltas`: upload (admin), list, inspect, and delete (admin) the deltas this server serves."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from deltas_store import StoredDelta, manifest_summary, read_manifest
from server.api.deps import AdminAuth, InferenceAuth, RuntimeDep
from server.api.schemas import DeletedDelta, DeltaInfo, DeltaList
from server.api.uploads import receive_upload
from server.errors import InvalidRequestError
from server.runtime import Runtime

router = APIRouter(tags=["deltas"])


def _info(runtime: Runtime, stored: StoredDelta) -> DeltaInfo:
    """Blocking: reads the delta file's header for its manifest."""
    summary = manifest_summary(read_manifest(stored.path), stored.size)
    device = runtime.cache.device_of(stored.name)
    active = runtime.swaps.active
    residency = "patched" if active == (stored.name, stored.version) else ("cached" if device else "disk")
    q = summary.get("q")
    return DeltaInfo(
        id=stored.name,
        name=stored.name,
        parent=runtime.base_id,
        version=stored.version,
        sha256=stored.sha256,
        size_bytes=stored.size,
        created=int(stored.created),
        method=str(summary["method"]),
        density=float(summary["density"]),  # type: ignore[arg-type]
        drop_rate=float(summary["drop_rate"]),  # type: ignore[arg-type]
        q=float(q) if isinstance(q, int | float) else None,
        residency=residency,
        device=device,
        manifest=summary,
    )


@router.post("/v1/deltas", status_code=201, dependencies=[AdminAuth])
async def upload_delta(request: Request, runtime: RuntimeDep) -> JSONResponse:
    """Multipart `file` + `name`: streamed to the store's staging area, verified, test-applied, stored."""
    with runtime.store.staging_file() as staged:
        fields = await receive_upload(request, staged, runtime.settings.max_upload_bytes)
        name = fields.get("name", "").strip()
        if not name:
            raise InvalidRequestError(
                "missing form field 'name' (the name to serve the delta under)", param="name"
            )
        try:
            stored = await asyncio.to_thread(runtime.admin.add, name, staged)
        except Exception:
            runtime.metrics.uploads.labels("rejected").inc()
            raise
    runtime.metrics.uploads.labels("stored").inc()
    info = await asyncio.to_thread(_info, runtime, stored)
    return JSONResponse(info.model_dump(), status_code=201)


@router.get("/v1/deltas", dependencies=[InferenceAuth])
async def list_deltas(runtime: RuntimeDep) -> DeltaList:
    def infos() -> list[DeltaInfo]:
        return [_info(runtime, d) for d in runtime.registry.deltas()]

    return DeltaList(data=await asyncio.to_thread(infos))


@router.get("/v1/deltas/{name}", dependencies=[InferenceAuth])
async def get_delta(name: str, runtime: RuntimeDep) -> DeltaInfo:
    ref = runtime.registry.resolve(name)
    if ref.stored is None:
        raise InvalidRequestError(f"{name!r} is the base model, not a delta", param="name")
    return await asyncio.to_thread(_info, runtime, ref.stored)


@router.delete("/v1/deltas/{name}", dependencies=[AdminAuth])
async def delete_delta(name: str, runtime: RuntimeDep) -> DeletedDelta:
    """Queued and running requests for `name` finish first; requests after this get 404."""
    if name == runtime.base_id:
        raise InvalidRequestError(f"{name!r} is the base model; it cannot be deleted", param="name")
    removed = await runtime.admin.remove(name, runtime.settings.drain_timeout_s)
    return DeletedDelta(id=name, versions=len(removed))
