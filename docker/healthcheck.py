"""Container healthcheck: exit 0 when the server's `GET /ready` answers 200, else 1 (standard library only)."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping


def ready_url(environ: Mapping[str, str] = os.environ) -> str:
    """The server's /ready on loopback, on the port the server reads (DELTASERVE_PORT, default 8000)."""
    return f"http://127.0.0.1:{environ.get('DELTASERVE_PORT') or '8000'}/ready"


def main() -> int:
    url = ready_url()
    # No proxies: Docker may pass the host's HTTP(S)_PROXY into the container, and loopback is local.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=4) as response:
            status = response.status
    except urllib.error.HTTPError as exc:  # 503 while the model loads
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:  # not listening yet, or timed out
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"{url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
