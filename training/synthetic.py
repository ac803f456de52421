"""A synthetic event log with planted multi-interest structure, for demos, scale and load tests.

The planted structure (what a good next-session model can recover and popularity cannot):

1. **Items.** Every item belongs to one latent topic. Popularity is Zipf(`zipf_a`) over a
   random ranking of all items, so it is Zipf-like both across and within topics.
2. **Categories are a noisy view of topics.** `category` is the item's topic, except for a
   `category_noise` share of items whose category is random: a useful side feature, not an
   oracle.
3. **Users.** Each user has a sparse mixture over `topics_per_user` topics (Dirichlet(1)
   weights) and a sticky *active* topic. Between sessions the active topic is redrawn from the
   mixture with probability `switch`, and with probability `drift` one mixture topic is
   replaced by a random one, so interests drift slowly.
4. **Sessions.** Each shows ~`impressions_per_session` distinct items: a `popular_share` of
   draws from global popularity, the rest from the user's current interest (active topic
   weighted by `focus`, the mixture by 1 - focus), inside the topic with probability
   ∝ popularity ** `interest_popularity`. The exponent (0.5) is the trade-off: at 1, interest
   draws chase the same head items as popularity and a top-50 popularity list already covers
   most clicks on small catalogues; at 0, popularity would say nothing inside a topic.
5. **Clicks.** P(click) = `click_base` + `click_gain` * interest(item topic) / interest(top
   topic): driven by the user's current interest, plus a little noise. So next-session
   positives are predictable from the topics of past positives, far better than popularity.
6. **Time.** Users start within 3 days of `start_timestamp`; sessions follow each other after
   1 h + Exp(`mean_gap_hours`) of inactivity; impressions inside one are 5-60 s apart, so a
   30-minute time-gap sessionization recovers the given session ids.

Vectorised numpy: the only Python loop runs over the session index (max sessions per user),
not over users or events. Deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

_USER_START_SPREAD_S = 3 * 86_400
_MIN_GAP_S = 3_600
_IMPRESSION_GAP_S = (5, 60)
_MIN_IMPRESSIONS = 5
_OVERSAMPLE = 1.5  # candidate draws per wanted impression (repeats are dropped)


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and knobs of the generator; defaults train a small model in ~2 CPU-minutes."""

    n_users: int = 2000
    n_items: int = 2000
    n_topics: int = 20
    topics_per_user: int = 3
    sessions_per_user: float = 10.0  # mean; every user gets at least min_sessions
    min_sessions: int = 3
    impressions_per_session: float = 20.0  # mean (Poisson, at least 5), before dedupe
    popular_share: float = 0.3  # impressions drawn from global popularity
    zipf_a: float = 1.1
    interest_popularity: float = 0.5  # exponent on popularity for interest-driven draws
    switch: float = 0.3  # P(active topic redrawn from the mixture) between sessions
    drift: float = 0.1  # P(one mixture topic replaced by a random topic) between sessions
    focus: float = 0.6  # weight of the active topic in the current interest
    click_base: float = 0.02  # click noise: P(click) on an item of no interest
    click_gain: float = 0.35  # extra P(click) on an item of the user's top current topic
    category_noise: float = 0.3  # share of items whose category is random, not their topic
    mean_gap_hours: float = 20.0
    start_timestamp: int = 1_700_000_000  # 2023-11-14 UTC
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items", "n_topics", "topics_per_user", "min_sessions"):
            if getattr(self, name) < 1:
                raise ValueError(f"SyntheticConfig.{name} must be >= 1")
        if self.topics_per_user > self.n_topics:
            raise ValueError("SyntheticConfig.topics_per_user must be <= n_topics")
        if self.sessions_per_user < self.min_sessions:
            raise ValueError("SyntheticConfig.sessions_per_user must be >= min_sessions")
        for name in (
            "popular_share",
            "interest_popularity",
            "switch",
            "drift",
            "focus",
            "category_noise",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SyntheticConfig.{name} must be in [0, 1]")
        if not 0.0 <= self.click_base + self.click_gain <= 1.0:
            raise ValueError("SyntheticConfig.click_base + click_gain must be in [0, 1]")


@dataclass(frozen=True)
class SyntheticWorld:
    """The latent item side of a config: what a perfect model would know."""

    item_topic: np.ndarray  # int64 (n_items,) latent topic
    item_popularity: np.ndarray  # float64 (n_items,), sums to 1
    item_category: np.ndarray  # int64 (n_items,) observed, noisy topic


def generate_world(config: SyntheticConfig) -> SyntheticWorld:
    """Item topics, Zipf popularity and noisy categories for `config` (deterministic)."""
    rng = np.random.default_rng([config.seed, 0])
    topic = rng.integers(config.n_topics, size=config.n_items)
    rank = rng.permutation(config.n_items)
    popularity = 1.0 / (rank + 1.0) ** config.zipf_a
    noisy = rng.random(config.n_items) < config.category_noise
    category = np.where(noisy, rng.integers(config.n_topics, size=config.n_items), topic)
    return SyntheticWorld(topic, popularity / popularity.sum(), category)


def generate_events(config: SyntheticConfig) -> pd.DataFrame:
    """A canonical event log (user_id, session_id, item_id, timestamp, label, category),
    sorted by user and time. Ids are zero-padded strings: u00042, u00042-s007, i01234, c07."""
    world = generate_world(config)
    rng = np.random.default_rng([config.seed, 1])
    n_sess = config.min_sessions + rng.poisson(
        config.sessions_per_user - config.min_sessions, size=config.n_users
    )
    slot_topic, slot_weight, s_user, s_index = _session_interests(config, n_sess, rng)

    # Impressions: popular draws or draws from the session's interest, by in-topic popularity.
    # Draw 1.5x + 5 candidates, keep each session's first n_imp distinct ones.
    n_imp = np.maximum(_MIN_IMPRESSIONS, rng.poisson(config.impressions_per_session, len(s_user)))
    n_draw = (n_imp * _OVERSAMPLE).astype(np.int64) + _MIN_IMPRESSIONS
    e_sess = np.repeat(np.arange(len(s_user)), n_draw)
    n = len(e_sess)
    slot = _sample_rows(slot_weight[e_sess], rng)
    from_topic = _sample_in_topic(world, slot_topic[e_sess, slot], config.interest_popularity, rng)
    popular = _sample_cdf(np.cumsum(world.item_popularity), n, rng)
    item = np.where(rng.random(n) < config.popular_share, popular, from_topic)
    _, first = np.unique(e_sess * np.int64(config.n_items) + item, return_index=True)
    first.sort()
    e_sess, item = e_sess[first], item[first]
    rank = np.arange(len(e_sess)) - np.searchsorted(e_sess, e_sess)  # position in session
    shown = rank < n_imp[e_sess]
    e_sess, item = e_sess[shown], item[shown]

    # Clicks from the current interest in the item's topic.
    same_topic = slot_topic[e_sess] == world.item_topic[item][:, None]  # (N, k)
    interest = (slot_weight[e_sess] * same_topic).sum(axis=1)
    top = slot_weight.max(axis=1)[e_sess]
    p_click = config.click_base + config.click_gain * interest / top
    label = (rng.random(len(item)) < p_click).astype(np.int8)

    timestamp = _timestamps(config, n_sess, s_user, e_sess, rng)
    users = _ids("u", range(config.n_users), width=5)
    items = _ids("i", range(config.n_items), width=5)
    cats = _ids("c", range(config.n_topics), width=2)
    session_ids = _ids("-s", s_index, width=3, prefixes=users[s_user])
    return pd.DataFrame(
        {
            "user_id": pd.Series(users[s_user[e_sess]], dtype=str),
            "session_id": pd.Series(session_ids[e_sess], dtype=str),
            "item_id": pd.Series(items[item], dtype=str),
            "timestamp": timestamp,
            "label": label,
            "category": pd.Series(cats[world.item_category[item]], dtype=str),
        }
    )


def _ids(tag: str, numbers, *, width: int, prefixes: np.ndarray | None = None) -> np.ndarray:
    """Zero-padded id strings (`<prefix><tag><number>`) as an object array: indexing it and
    handing it to pandas is ~100x faster than numpy's fixed-width str arrays."""
    numbers = np.asarray(numbers)
    width = max(width, len(str(int(numbers.max())))) if len(numbers) else width
    heads = prefixes if prefixes is not None else [""] * len(numbers)
    return np.array(
        [f"{h}{tag}{n:0{width}d}" for h, n in zip(heads, numbers.tolist(), strict=True)],
        dtype=object,
    )


def _session_interests(
    config: SyntheticConfig, n_sess: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per session (grouped by user, in order): the user's current topics and their weights.

    Returns slot_topic (S, k) int, slot_weight (S, k) float summing to 1 per row, the
    session's user (S,) and its index within the user (S,).
    """
    u, k = config.n_users, config.topics_per_user
    topics = np.argsort(rng.random((u, config.n_topics)), axis=1)[:, :k]  # (U, k) distinct
    mixture = rng.dirichlet(np.ones(k), size=u)  # (U, k)
    active = _sample_rows(mixture, rng)  # (U,)
    steps_topic, steps_weight = [], []
    for j in range(int(n_sess.max())):
        if j > 0:
            drifted = np.flatnonzero(rng.random(u) < config.drift)
            topics[drifted, rng.integers(k, size=len(drifted))] = rng.integers(
                config.n_topics, size=len(drifted)
            )
            switched = rng.random(u) < config.switch
            active = np.where(switched, _sample_rows(mixture, rng), active)
        weight = (1.0 - config.focus) * mixture
        weight[np.arange(u), active] += config.focus
        steps_topic.append(topics.copy())
        steps_weight.append(weight)
    # (J, U, k) -> sessions ordered by user then index, keeping j < n_sess[user].
    alive = np.arange(len(steps_topic))[None, :] < n_sess[:, None]  # (U, J)
    u_idx, j_idx = np.nonzero(alive)  # row-major: by user, then session index
    slot_topic = np.stack(steps_topic)[j_idx, u_idx]
    slot_weight = np.stack(steps_weight)[j_idx, u_idx]
    return slot_topic, slot_weight, u_idx, j_idx


def _sample_rows(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One column index per row of a (N, k) weight matrix, with probability ∝ the weights."""
    cdf = np.cumsum(weights, axis=1)
    draw = rng.random(len(weights)) * cdf[:, -1]
    return np.minimum((cdf <= draw[:, None]).sum(axis=1), weights.shape[1] - 1)


def _sample_cdf(cdf: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` indices drawn from an increasing CDF (faster than rng.choice with p=)."""
    return np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right"), len(cdf) - 1)


def _sample_in_topic(
    world: SyntheticWorld, topic: np.ndarray, exponent: float, rng: np.random.Generator
) -> np.ndarray:
    """One item per requested topic, with probability ∝ popularity ** exponent in the topic.

    Items are grouped by topic; each topic's CDF is shifted by its topic index into one
    increasing array, so a single searchsorted of (topic + u) samples every row at once.
    """
    by_topic = np.lexsort((np.arange(len(world.item_topic)), world.item_topic))
    t_sorted = world.item_topic[by_topic]
    pop = world.item_popularity[by_topic] ** exponent
    totals = np.bincount(t_sorted, weights=pop, minlength=int(topic.max()) + 1)
    # Within-topic CDF in [0, 1], offset by topic: topic t occupies (t, t + 1].
    starts = np.r_[0, np.cumsum(np.bincount(t_sorted))][t_sorted]
    within = np.cumsum(pop) - np.r_[0.0, np.cumsum(pop)][starts]
    shifted = t_sorted + within / totals[t_sorted]
    # A topic with no items falls back to its nearest non-empty neighbour via searchsorted.
    pos = np.searchsorted(shifted, topic + rng.random(len(topic)) * (1 - 1e-12), side="left")
    return by_topic[np.minimum(pos, len(by_topic) - 1)]


def _timestamps(
    config: SyntheticConfig,
    n_sess: np.ndarray,
    s_user: np.ndarray,
    e_sess: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Unix seconds per impression: sessions separated by 1 h + Exp(mean gap) of inactivity."""
    step = rng.integers(*_IMPRESSION_GAP_S, size=len(e_sess))
    sess_first = np.searchsorted(e_sess, np.arange(len(s_user)))  # every session has events
    step[sess_first] = 0
    elapsed = np.cumsum(step)
    in_sess = elapsed - elapsed[sess_first[e_sess]]  # seconds since the session's start
    duration = in_sess[np.r_[sess_first[1:], len(e_sess)] - 1]
    gap = _MIN_GAP_S + rng.exponential(config.mean_gap_hours * 3600, size=len(s_user))
    advance = duration + gap.astype(np.int64)  # from this session's start to the next's
    user_first = np.r_[0, np.cumsum(n_sess)[:-1]]
    total = np.cumsum(advance)
    before = total - advance  # sum of advances of earlier sessions, all users
    s_start = before - np.repeat(before[user_first], n_sess)
    user_start = config.start_timestamp + rng.integers(_USER_START_SPREAD_S, size=config.n_users)
    s_start = s_start + user_start[s_user]
    return (s_start[e_sess] + in_sess).astype(np.int64)
