"""How raw sessions become model inputs — one definition shared by training and serving.

Training (`training.batching`) and the service (`service.runner`) both turn a closed session
into a session token and a request into a query token; if they disagreed on which items a
token pools or how the time gap is measured, served recommendations would silently drift from
what was trained and evaluated. These two rules are therefore defined once, here, in numpy
(no torch).
"""

from __future__ import annotations

import numpy as np

NO_PREVIOUS = -1  # gap value of a user's first session (model bucket 0)


def cap_events(
    items: np.ndarray, labels: np.ndarray, max_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """A session's (items, labels) capped at ``max_items``, positives kept first.

    Pooling is order-free, so keeping the positives first (stable) means the cap never hides
    what the user engaged with; within each label the original order decides what is kept.
    """
    if len(items) <= max_items:
        return items, labels
    order = np.argsort(-np.asarray(labels), kind="stable")[:max_items]
    return items[order], labels[order]


def session_gap(started_at: int, previous_ended_at: int | None) -> int:
    """Seconds between the previous session's end and this start; ``NO_PREVIOUS`` if none.

    Overlapping sessions (a start before the previous end) count as a zero gap.
    """
    if previous_ended_at is None:
        return NO_PREVIOUS
    return max(int(started_at) - int(previous_ended_at), 0)
