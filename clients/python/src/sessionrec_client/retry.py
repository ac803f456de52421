"""Retry strategy, injected into the clients (like redis-py's ``Retry``).

Only calls that are safe to repeat are retried: recommendations (read-only), session closes
(idempotent on ``session_id``), user deletes and the ops GETs — never ``/admin/reload``.
Retried: transport errors and 503 (overloaded, state store down). Everything else (4xx, other
5xx) is final. Waits are exponential with full jitter, capped, and the number of attempts is
bounded — there is no unbounded retry loop on anyone's request path.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Retry:
    attempts: int = 3  # total tries, the first included; 1 = no retries
    backoff_base: float = 0.05  # seconds before the second try (times 2 per further try)
    backoff_max: float = 1.0
    statuses: frozenset[int] = field(default_factory=lambda: frozenset({503}))

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_base < 0 or self.backoff_max < 0:
            raise ValueError("attempts must be >= 1 and backoffs >= 0")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based): full jitter."""
        cap = min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
        return (rng or random).uniform(0, cap)


NO_RETRY = Retry(attempts=1)
