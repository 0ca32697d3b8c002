"""Cached getters for the services routes use.

Nothing touches AWS or Postgres at import time; the first request builds the
service. Tests call `reset()` after changing the environment.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chalicelib.databases import DatabaseService
    from chalicelib.health import HealthCheck


def _init_logging() -> None:
    logger = logging.getLogger("instapg")
    logger.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        logger.addHandler(handler)


@functools.lru_cache(maxsize=1)
def databases() -> DatabaseService:
    from chalicelib import keyrings, models
    from chalicelib.databases import DatabaseService
    from chalicelib.settings import get_settings

    _init_logging()
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
