"""Cached getters for the services routes use.

Nothing touches AWS or Postgres at import time; the first request builds the
service. Tests call `reset()` after changing the environment.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chalicelib.databases import DatabaseService
    from chalicelib.health import HealthCheck


@functools.lru_cache(maxsize=1)
def databases() -> DatabaseService:
    from chalicelib import keyrings, models
    from chalicelib.databases import DatabaseService
    from chalicelib.settings import get_settings

    settings = get_settings()
    models.configure(settings)
    return DatabaseService(settings, keyrings.load(settings))


@functools.lru_cache(maxsize=1)
def health() -> HealthCheck:
    from chalicelib.health import HealthCheck

    return HealthCheck(databases())


def reset() -> None:
    from chalicelib.settings import get_settings

    get_settings.cache_clear()
    databases.cache_clear()
    health.cache_clear()
