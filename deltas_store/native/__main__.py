"""`python -m deltas_store.native`: build (or find) this machine's native kernels and print the file."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from deltas_store.native import NativeBuildError, build, cached_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    parser.add_argument("--copy-to", type=Path, help="also copy the built module file here")
    parser.add_argument("--marker", type=Path, help=argparse.SUPPRESS)  # removed when the build ends
    args = parser.parse_args()
    try:
        build(verbose=not args.quiet)
    except NativeBuildError as exc:
        print(f"deltaserve native kernels: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.marker is not None:
            args.marker.unlink(missing_ok=True)
    if args.copy_to is not None:
        shutil.copyfile(cached_path(), args.copy_to)
    if not args.quiet:
        print(cached_path())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
