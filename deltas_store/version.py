"""The installed deltaserve version (recorded in every manifest)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deltaserve")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"
