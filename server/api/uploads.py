"""Streaming a multipart upload straight into a staging file, under a size limit, never holding it in memory."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from server.errors import InvalidRequestError, PayloadTooLargeError

FILE_FIELD = "file"
_MAX_FIELD_BYTES = 4096  # form fields other than the file (the delta's name)
_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and part headers around the file


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    is_file: bool = False


class _UploadParser:
    """python-multipart callbacks: file bytes are queued for the writer, small fields kept in memory."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.fields: dict[str, str] = {}
        self.file_bytes = 0
        self.file_parts = 0
        self.pending: list[bytes] = []  # file data parsed but not yet written
        self._part = _Part()
        self._field_name = b""
        self._header_value = b""
        self._value = bytearray()

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._part = _Part()
        self._value = bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._part.headers[self._field_name.lower()] = self._header_value
        self._field_name, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._part.headers.get(b"content-disposition", b""))
        self._part.name = options.get(b"name", b"").decode("utf-8", "replace")
        self._part.is_file = self._part.name == FILE_FIELD
        if self._part.is_file:
            self.file_parts += 1
            if self.file_parts > 1:
                raise InvalidRequestError("send exactly one 'file' part", param=FILE_FIELD)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part.is_file:
            self.file_bytes += end - start
            if self.file_bytes > self.limit:
                raise PayloadTooLargeError(f"the delta file is over the upload limit of {self.limit} bytes")
            self.pending.append(data[start:end])
            return
        self._value += data[start:end]
        if len(self._value) > _MAX_FIELD_BYTES:
            raise InvalidRequestError(f"form field {self._part.name!r} is too long", param=self._part.name)

    def _part_end(self) -> None:
        if not self._part.is_file and self._part.name:
            self.fields[self._part.name] = self._value.decode("utf-8", "replace")


async def receive_upload(request: Request, dest: Path, limit: int) -> dict[str, str]:
    """Write the multipart `file` part of `request` to `dest`; returns the other form fields.

    Raises PayloadTooLargeError as soon as the file (or the declared body) is over `limit`, and
    InvalidRequestError for anything that is not a well-formed upload with exactly one file.
    """
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise InvalidRequestError("send the delta as multipart/form-data with fields 'file' and 'name'")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + _OVERHEAD_BYTES:
        raise PayloadTooLargeError(f"the upload ({declared} bytes) is over the limit of {limit} bytes")
    parser = _UploadParser(limit)
    multipart = MultipartParser(boundary, parser.callbacks())  # type: ignore[arg-type]
    with dest.open("wb") as out:
        try:
            async for chunk in request.stream():
                multipart.write(chunk)
                if parser.pending:
                    data, parser.pending = b"".join(parser.pending), []
                    await asyncio.to_thread(_write, out, data)
            multipart.finalize()
        except FormParserError as exc:
            raise InvalidRequestError(f"malformed multipart body: {exc}") from None
        await asyncio.to_thread(_flush, out)
    if parser.file_parts != 1:
        raise InvalidRequestError("missing the 'file' part (the .safetensors delta)", param=FILE_FIELD)
    return parser.fields


def _write(out: BinaryIO, data: bytes) -> None:
    out.write(data)


def _flush(out: BinaryIO) -> None:
    out.flush()
