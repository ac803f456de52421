"""Per-user state in Redis: the raw session log and the K/V cache, moved as bytes.

Keys of one user share a hash tag, so they live in one Redis Cluster slot and every script
below touches a single slot::

    sr:{<user>}:log   ZSET  member = encoded SessionRecord, score = ended_at (time order)
    sr:{<user>}:ids   ZSET  member = session_id, score = log sequence number (idempotency)
    sr:{<user>}:seq   STRING  log sequence number, +1 per appended session
    sr:{<user>}:kv    STRING  encoded KVState (model version + the log seq it reflects)

A log's sequence starts at the Redis server clock in microseconds when the log is created (the
first session, or the first after the user expired or was deleted), so sequences never repeat
across a user's lifetimes: a cache tagged by a deleted or expired log, or a write-back still in
flight when the user was deleted, can never match a new log. The cache takes the sequence
key's remaining TTL, so it never outlives its log.

Appending is one Lua script: a session id seen before is a no-op (idempotent retries and
duplicate deliveries), otherwise the record is added, the log trimmed to ``max_sessions``
(oldest by end time first), the sequence bumped and TTLs refreshed — atomically, so
concurrent closes for one user never lose a session. The log, not the cache, is the source of
truth: a K/V write is a compare-and-set on the sequence number, so a cache computed from an
older log can never overwrite a newer one, and a reader that sees ``kv.log_seq != seq`` knows
the cache is stale. Session ids are remembered for ``max_ids`` sessions (default: as many as
the log holds), so a duplicate of any logged session is recognised. More ids would catch later
duplicates of evicted sessions, but Redis stores a sorted set of more than 128 entries as a
skiplist (~120 B per id instead of ~9): 516 ids cost 57 KB per user, most of a full cache
(measured, docs/BENCHMARKS.md).

Sizing: a cache rebuilt from the log is exact only when the log holds the model's whole
receptive field, ``n_layers · window`` sessions (model_store/model.py), plus one older
session for the oldest one's time gap — set ``max_sessions`` to at least that.

Ordering: the log is ordered by ``ended_at`` (ties by record bytes). Training orders a user's
sessions by start time; the two agree unless sessions overlap in time.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from redis.exceptions import NoScriptError

from service.state import (
    KVDType,
    KVState,
    SessionRecord,
    StateFormatError,
    decode_kv,
    decode_session,
    encode_kv,
    encode_session,
)

log = logging.getLogger(__name__)

# No braces (they would move the hash tag), no whitespace, bounded: nothing forges a key.
USER_ID_RE = re.compile(r"[A-Za-z0-9._:@-]{1,128}")

_APPEND = """
local seq_now = tonumber(redis.call('GET', KEYS[3]) or '0')
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return {0, seq_now}
end
local seq
if seq_now == 0 then
  -- A new log (first session ever, or after expiry or DELETE): its sequence starts at the
  -- server clock in microseconds, above every sequence an earlier log of this user had, so
  -- no cache tagged by an earlier log can ever match it; a leftover cache is dropped too.
  local t = redis.call('TIME')
  seq = tonumber(t[1]) * 1000000 + tonumber(t[2])
  redis.call('SET', KEYS[3], string.format('%.0f', seq))
  redis.call('DEL', KEYS[4])
else
  seq = redis.call('INCR', KEYS[3])
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[4]) + 1))
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[5]) + 1))
local ttl = tonumber(ARGV[6])
if ttl > 0 then
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl) end
  if redis.call('EXISTS', KEYS[4]) == 1 then redis.call('PEXPIRE', KEYS[4], ttl) end
end
return {1, seq}
"""

# The cache never outlives its log: it takes the sequence key's remaining TTL.
_PUT_KV = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur == 0 or cur ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
"""


@dataclass(frozen=True)
class AppendResult:
    appended: bool  # False: the session id was already in the log (a duplicate)
    seq: int  # the log sequence number after the call


@dataclass(frozen=True)
class UserState:
    user_id: str
    sessions: list[SessionRecord]  # oldest → newest by ended_at, at most max_sessions
    seq: int  # 0 = no history
    kv: KVState | None  # None: absent or unreadable (rebuild from the log)


@dataclass(frozen=True)
class CachedState:
    user_id: str
    seq: int  # 0 = no history
    kv: KVState | None  # None: absent or unreadable


def check_user_id(user_id: str) -> str:
    if not isinstance(user_id, str) or not USER_ID_RE.fullmatch(user_id):
        raise ValueError(f"invalid user id {user_id!r}: 1-128 characters of A-Z a-z 0-9 . _ : @ -")
    return user_id


class RedisStateStore:
    """Async state store over a redis-py client (``redis.asyncio.Redis`` or ``RedisCluster``).

    Constructors assign; the caller owns the client's lifecycle.
    """

    def __init__(
        self,
        client,
        *,
        max_sessions: int,
        max_ids: int | None = None,
        ttl_seconds: int | None = None,
        prefix: str = "sr",
        kv_dtype: KVDType = KVDType.FLOAT32,
    ) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self.client = client
        self.max_sessions = max_sessions
        self.max_ids = max_ids if max_ids is not None else max_sessions
        self.ttl_ms = int(ttl_seconds * 1000) if ttl_seconds else 0
        self.prefix = prefix
        self.kv_dtype = kv_dtype
        self._append = client.register_script(_APPEND)
        self._put_kv = client.register_script(_PUT_KV)

    async def load_scripts(self) -> None:
        """Load the Lua scripts on every primary. Single-node pipelines load them on demand,
        but a Redis Cluster pipeline cannot, and a restarted Redis has forgotten them."""
        for script in (self._append, self._put_kv):
            await self.client.script_load(script.script)

    def keys(self, user_id: str) -> tuple[str, str, str, str]:
        """(log, ids, seq, kv) keys of one user, co-located by the ``{user}`` hash tag."""
        tag = f"{self.prefix}:{{{check_user_id(user_id)}}}"
        return f"{tag}:log", f"{tag}:ids", f"{tag}:seq", f"{tag}:kv"

    async def append_session(self, user_id: str, record: SessionRecord) -> AppendResult:
        """Append one closed session atomically; a known ``session_id`` is a no-op."""
        appended, seq = await self._append(
            keys=list(self.keys(user_id)), args=self._append_args(record)
        )
        return AppendResult(bool(appended), int(seq))

    async def append_many(self, sessions: list[tuple[str, SessionRecord]]) -> list[AppendResult]:
        """`append_session` for many (user, session) pairs in one pipelined round trip (each
        append is still its own atomic script; pairs of one user apply in the given order)."""
        try:
            return await self._append_pipeline(sessions)
        except NoScriptError:
            await self.load_scripts()
            return await self._append_pipeline(sessions)

    async def _append_pipeline(
        self, sessions: list[tuple[str, SessionRecord]]
    ) -> list[AppendResult]:
        # EVALSHA directly: redis-py's Script objects add a SCRIPT EXISTS round trip per
        # pipeline; a NOSCRIPT reply is handled by the caller (load, retry once).
        pipe = self.client.pipeline(transaction=False)
        for user_id, record in sessions:
            pipe.evalsha(self._append.sha, 4, *self.keys(user_id), *self._append_args(record))
        return [AppendResult(bool(a), int(seq)) for a, seq in await pipe.execute()]

    def _append_args(self, record: SessionRecord) -> list:
        return [
            record.session_id,
            encode_session(record),
            record.ended_at,
            self.max_sessions,
            self.max_ids,
            self.ttl_ms,
        ]

    async def get_many(self, user_ids: list[str], *, last: int | None = None) -> list[UserState]:
        """Sequence number, log (the newest ``last`` sessions; all by default) and K/V cache of
        many users in one pipelined round trip.

        The sequence is read *before* the log: the pipeline is not atomic, so an append may
        land in between, and this order makes the log at least as new as the sequence — a
        cache rebuilt from it and tagged with that sequence then fails the compare-and-set
        instead of claiming a log it does not contain.
        """
        pipe = self.client.pipeline(transaction=False)
        for user_id in user_ids:
            log_key, _, seq_key, kv_key = self.keys(user_id)
            pipe.get(seq_key)
            pipe.zrange(log_key, -last if last else 0, -1)
            pipe.get(kv_key)
        replies = await pipe.execute()
        return [
            self._user_state(user_id, replies[3 * i + 1], replies[3 * i], replies[3 * i + 2])
            for i, user_id in enumerate(user_ids)
        ]

    async def get_kv_many(self, user_ids: list[str]) -> list[CachedState]:
        """Sequence number and K/V cache of many users in one round trip — the hot path of a
        recommendation, which needs the log only when the cache is missing or stale."""
        pipe = self.client.pipeline(transaction=False)
        for user_id in user_ids:
            _, _, seq_key, kv_key = self.keys(user_id)
            pipe.get(seq_key)
            pipe.get(kv_key)
        replies = await pipe.execute()
        return [
            CachedState(user_id, int(replies[2 * i] or 0), self._kv(user_id, replies[2 * i + 1]))
            for i, user_id in enumerate(user_ids)
        ]

    async def put_kv_many(self, states: list[tuple[str, KVState]]) -> list[bool]:
        """Write caches; each only if the user's log is still at ``state.log_seq``."""
        try:
            return await self._put_kv_pipeline(states)
        except NoScriptError:  # Redis restarted (or a new cluster node): load, retry once
            await self.load_scripts()
            return await self._put_kv_pipeline(states)

    async def _put_kv_pipeline(self, states: list[tuple[str, KVState]]) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        for user_id, state in states:
            _, _, seq_key, kv_key = self.keys(user_id)
            payload = encode_kv(state, self.kv_dtype)
            pipe.evalsha(self._put_kv.sha, 2, seq_key, kv_key, state.log_seq, payload)
        return [bool(x) for x in await pipe.execute()]

    async def delete_user(self, user_id: str) -> bool:
        """Forget a user: every key. True if anything existed."""
        return bool(await self.client.delete(*self.keys(user_id)))

    def _user_state(self, user_id: str, raw_log, raw_seq, raw_kv) -> UserState:
        sessions = []
        for raw in raw_log:
            try:
                sessions.append(decode_session(raw))
            except StateFormatError as exc:  # cannot be recovered; keep serving the rest
                log.error("user %s: unreadable session record dropped: %s", user_id, exc)
        return UserState(user_id, sessions, int(raw_seq or 0), self._kv(user_id, raw_kv))

    @staticmethod
    def _kv(user_id: str, raw_kv: bytes | None) -> KVState | None:
        if raw_kv is None:
            return None
        try:
            return decode_kv(raw_kv)
        except StateFormatError as exc:
            log.warning("user %s: unreadable K/V cache, rebuilding: %s", user_id, exc)
            return None
