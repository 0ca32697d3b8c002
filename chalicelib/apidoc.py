"""The OpenAPI document (chalicelib/openapi.yaml; the repo root's openapi.yaml links to it)."""

from __future__ import annotations

import functools
from pathlib import Path

PATH = Path(__file__).with_name("openapi.yaml")


@functools.lru_cache(maxsize=1)
def text() -> str:
    # Read on first request, not at import: a cold start that never serves it pays nothing.
    return PATH.read_text(encoding="utf-8")
