"""deltaserve's Python SDK: sync and async clients for the OpenAI-compatible and delta-admin REST API."""

from client import errors, types
from client.async_client import AsyncClient, AsyncStream
from client.settings import ClientSettings
from client.sync_client import Client, Stream

__all__ = ["AsyncClient", "AsyncStream", "Client", "ClientSettings", "Stream", "errors", "types"]
