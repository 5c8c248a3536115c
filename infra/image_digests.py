"""Third-party image references not pinned by a digest; exits 1 while any is left.

    python infra/image_digests.py

A tag moves when its publisher rebuilds it, a digest never does: every FROM line and `image:` field below
carries a tag (to read) and a digest (what is pulled). To move one, look the digest up (docs/deploy.md,
"Image digests"):

    docker buildx imagetools inspect redis:7.4.7-alpine --format '{{json .Manifest.Digest}}'
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("Dockerfile", "k8s/pipeline/Dockerfile", "infra/compose.yaml", "infra/k8s/redis.yaml",
           "infra/k8s/minio.yaml")
_REFERENCE = re.compile(r"^\s*(?:FROM|image:)\s+(\S+)", re.MULTILINE)
_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def references() -> list[tuple[str, str]]:
    """(file, image reference) for every FROM line and `image:` field of SOURCES."""
    return [(name, ref) for name in SOURCES for ref in _REFERENCE.findall((ROOT / name).read_text())]


def unpinned() -> list[tuple[str, str]]:
    """(file, reference) for every reference without a digest."""
    return [(name, ref) for name, ref in references() if not _DIGEST.search(ref)]


def main() -> int:
    missing = unpinned()
    for name, ref in missing:
        print(f"{name}: {ref}: no digest")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
