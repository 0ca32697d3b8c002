"""Plans: the tiers of limits a database has (unclaimed, claimed), and how they are read from settings.

chalicelib.settings builds them from the environment (INSTAPG_UNCLAIMED_*, INSTAPG_CLAIMED_*) and
re-exports them; this module reads no environment itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Plans (tiers of limits), named for what they are, not for the statuses that
# use them. Their values are what records store in `plan`, what the API shows,
# and what INSTAPG_UNCLAIMED_*/INSTAPG_CLAIMED_* configure: tables already
# hold them, so the values stay.
TRIAL_PLAN = "unclaimed"  # a new database's plan, until it is claimed (models.UNCLAIMED is the status)
FREE_PLAN = "claimed"  # a claimed database's plan (models.CLAIMED is the status)


@dataclass(frozen=True)
class Plan:
    """Limits of one tier. The single source of truth for every limit."""

    name: str
    storage_mb: int
    connections: int
    statement_timeout_s: int
    lifetime_s: int | None  # None: never expires
    # Enforced by the scheduled job (chalicelib.quotas): sessions idle inside a
    # transaction longer than this are ended; they hold locks and snapshots.
    idle_in_transaction_s: int
    # Per-role temp_file_limit where the admin may set it (superuser-only GUC).
    temp_file_limit_mb: int
    # Bytes in plus out through the pooler per calendar month (UTC), enforced by chalicelib.metering.
    transfer_mb: int = 1024

    @property
    def storage_bytes(self) -> int:
        return self.storage_mb * 1024 * 1024

    @property
    def transfer_bytes(self) -> int:
        return self.transfer_mb * 1024 * 1024

    def public(self) -> dict:
        return {"storage_mb": self.storage_mb, "connections": self.connections}


def from_settings(read_int: Callable[[str], int]) -> dict[str, Plan]:
    """Both plans, each limit read by `read_int(<setting name>)` (chalicelib.settings' checked reader)."""
    return {
        TRIAL_PLAN: Plan(
            TRIAL_PLAN,
            storage_mb=read_int("INSTAPG_UNCLAIMED_STORAGE_MB"),
            connections=read_int("INSTAPG_UNCLAIMED_CONNECTIONS"),
            statement_timeout_s=read_int("INSTAPG_UNCLAIMED_STATEMENT_TIMEOUT_SECONDS"),
            idle_in_transaction_s=read_int("INSTAPG_UNCLAIMED_IDLE_IN_TRANSACTION_SECONDS"),
            temp_file_limit_mb=read_int("INSTAPG_UNCLAIMED_TEMP_FILE_LIMIT_MB"),
            transfer_mb=read_int("INSTAPG_UNCLAIMED_TRANSFER_MB"),
            lifetime_s=read_int("INSTAPG_UNCLAIMED_LIFETIME_SECONDS"),
        ),
        FREE_PLAN: Plan(
            FREE_PLAN,
            storage_mb=read_int("INSTAPG_CLAIMED_STORAGE_MB"),
            connections=read_int("INSTAPG_CLAIMED_CONNECTIONS"),
            statement_timeout_s=read_int("INSTAPG_CLAIMED_STATEMENT_TIMEOUT_SECONDS"),
            idle_in_transaction_s=read_int("INSTAPG_CLAIMED_IDLE_IN_TRANSACTION_SECONDS"),
            temp_file_limit_mb=read_int("INSTAPG_CLAIMED_TEMP_FILE_LIMIT_MB"),
            transfer_mb=read_int("INSTAPG_CLAIMED_TRANSFER_MB"),
            lifetime_s=None,
        ),
    }
