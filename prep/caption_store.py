"""The shared, content-addressed caption store (SQLite, stdlib only).

Every step that needs a node caption (caption, ask, eval, synthesize, rl,
import/export) reads and writes this one store, so a caption is paid for once.
A caption is addressed by what produced it, never by a file path:

    (video_id, level, node span, model, prompt hash, frame settings)

hashed to a sha256 digest, the primary key. Change any part (another model,
another prompt, other frame settings) and it is a different caption.

Concurrency: several processes (parallel caption workers, an eval next to a
caption run) may share one file. The store uses WAL (readers never block the
writer), a generous busy timeout (writers queue instead of failing), one
connection per thread (sqlite3 connections must not be shared across threads
or a fork), and one-statement transactions, so no lock is ever held for
long. `put` is insert-if-absent: the first writer wins and a key never gets a
second row. Calls are quick, so asyncio code may call them directly.

Paying once across processes: before asking a model, a process takes a claim
on the caption's digest (`claim`). Another process that wants the same
caption waits for it instead of asking too. A claim is renewed while held and
expires when its owner stops renewing it (killed, hung), and one held by a
process of this host that no longer runs is taken over at once.

Damage: the file is checked (`PRAGMA quick_check`: about 0.1 s for 50,000
captions, 200 MB, on an idle machine) before anything writes to it. A damaged file is never recreated
or overwritten, since its captions cost money: the error says how to move it
aside and salvage it.
"""

from __future__ import annotations

import asyncio
import json
import hashlib
import math
import os
import secrets
import shlex
import socket
import sqlite3
import threading
import time
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterable, Iterator

SCHEMA_VERSION = 1
STORE_FILENAME = "captions.sqlite3"
LEVELS = ("high", "medium", "low")
TIME_DECIMALS = 4           # node spans are rounded like the node records (segment.py)
BUSY_TIMEOUT_S = 60.0       # writers wait this long for the lock before giving up
BATCH = 500                 # keys per IN (...) query; well under SQLite's variable limit
CLAIM_TTL_S = 60.0          # a claim not renewed for this long is dead: its owner crashed or hung
CLAIM_POLL_S = (0.05, 1.0)  # first and longest wait between looks at someone else's claim
HOST = socket.gethostname()
# SQLite result codes (the low byte of an extended code).
SQLITE_CORRUPT, SQLITE_FULL, SQLITE_NOTADB = 11, 13, 26


class CaptionStoreError(OSError):
    """The store file cannot be used (damaged, not a store, a full disk...).

    The message is one line naming the file. An OSError, so commands that
    report unusable files report this one too.
    """


def captions_path(cache_dir: "str | os.PathLike") -> Path:
    """Where the caption store lives inside a cache directory."""
    return Path(cache_dir) / STORE_FILENAME


def _canonical(value) -> str:
    # One spelling per value, so equal keys always hash equal.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def _norm_time(x) -> float:
    t = round(float(x), TIME_DECIMALS)
    if not math.isfinite(t):
        raise ValueError(f"node time must be finite, got {x!r}")
    return t + 0.0  # turns -0.0 into 0.0, which would otherwise hash differently


@dataclass(frozen=True)
class CaptionKey:
    """What a caption is addressed by. Fields are normalised on creation."""

    video_id: str
    level: str            # "high" | "medium" | "low"
    start: float          # node span in seconds, rounded to 4 decimals
    end: float
    model: str
    prompt_hash: str
    frame_settings: str   # canonical JSON, see CaptionKey.settings

    def __post_init__(self) -> None:
        level = getattr(self.level, "label", self.level)  # accepts tree.Level too
        level = str(level).strip().lower()
        if level not in LEVELS:
            raise ValueError(f"caption key level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        for name in ("video_id", "model", "prompt_hash"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"caption key {name} must be a non-empty string")
        settings = self.frame_settings
        if isinstance(settings, str):
            try:
                settings = json.loads(settings)
            except json.JSONDecodeError as e:
                raise ValueError(f"caption key frame_settings is not JSON ({e.msg})") from None
        elif not isinstance(settings, dict):
            raise ValueError("caption key frame_settings must be a JSON string or a dict")
        object.__setattr__(self, "level", level)
        object.__setattr__(self, "start", _norm_time(self.start))
        object.__setattr__(self, "end", _norm_time(self.end))
        # Re-spelled canonically so '{"side":512,"frames":32}' and its reordering match.
        object.__setattr__(self, "frame_settings", _canonical(settings))

    @staticmethod
    def settings(**kw) -> str:
        """Canonical JSON of frame settings: sorted keys, no spaces."""
        return _canonical(kw)

    def to_dict(self) -> dict:
        return {"video_id": self.video_id, "level": self.level, "start": self.start,
                "end": self.end, "model": self.model, "prompt_hash": self.prompt_hash,
                "frame_settings": self.frame_settings}

    def digest(self) -> str:
        """sha256 hex of the canonical JSON of all fields: the store's primary key."""
        return hashlib.sha256(_canonical(self.to_dict()).encode("utf-8")).hexdigest()


@dataclass
class CaptionEntry:
    key: CaptionKey
    node_id: tuple[int, ...]
    caption: str
    meta: dict = field(default_factory=dict)   # free JSON: tokens, seconds, raw reply, created_at...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS captions (
    digest          TEXT NOT NULL UNIQUE,
    video_id        TEXT NOT NULL,
    level           TEXT NOT NULL,
    start           REAL NOT NULL,
    "end"           REAL NOT NULL,
    model           TEXT NOT NULL,
    prompt_hash     TEXT NOT NULL,
    frame_settings  TEXT NOT NULL,
    node_id         TEXT NOT NULL,
    caption         TEXT NOT NULL,
    meta            TEXT NOT NULL,
    created_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS captions_by_video ON captions (video_id, model);
"""
# Who is making which caption now (see CaptionStore.claim). Rows are
# short-lived; stores made before claims existed get the table on open.
_CLAIMS_SCHEMA = """
CREATE TABLE IF NOT EXISTS claims (
    digest   TEXT PRIMARY KEY,
    owner    TEXT NOT NULL,      -- host:pid:random, one per claim
    expires  REAL NOT NULL       -- unix time
)
"""
_COLUMNS = ('digest, video_id, level, start, "end", model, prompt_hash, frame_settings, '
            'node_id, caption, meta')


class CaptionStore:
    """A caption store in one SQLite file; safe for many threads and processes."""

    def __init__(self, path: "str | os.PathLike"):
        self.path = Path(path).expanduser()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._pid = os.getpid()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CaptionStoreError(f"{self.path}: cannot create its directory ({e.strerror})") from None
        if self.path.is_dir():
            raise CaptionStoreError(f"{self.path}: is a directory, not a caption store file")
        with self._errors():
            self._check_integrity()
            self._init_schema(self._conn())

    # -- connections ----------------------------------------------------------

    @contextmanager
    def _errors(self):
        """Turn SQLite failures into one-line CaptionStoreErrors naming the file."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            code = getattr(e, "sqlite_errorcode", None)  # Python 3.11+
            code = None if code is None else code & 0xFF
            if code in (SQLITE_CORRUPT, SQLITE_NOTADB) or "not a database" in msg or "malformed" in msg:
                raise self._damaged(msg) from None
            if code == SQLITE_FULL or "disk is full" in msg:
                # SQLite rolls the failed statement back: no half-written row.
                raise CaptionStoreError(f"{self.path}: the disk is full ({msg}); the failed write left "
                                        f"the caption store as it was - free some space and rerun") from None
            raise CaptionStoreError(f"{self.path}: {msg}") from None

    def _damaged(self, reason: str) -> CaptionStoreError:
        """The error for a damaged file: what is wrong and the exact commands to recover."""
        reason = " ".join(reason.replace("*** in database main ***", "").split())  # one line
        here = shlex.quote(str(self.path))
        aside = self.path.parent / f"damaged-{self.path.name}"
        # .dump ends in ROLLBACK when it met damage; COMMIT keeps the rows it could read.
        # (sqlite3's .recover saves more where the build has it; Debian's lacks it.)
        salvage = (f"sqlite3 {shlex.quote(str(aside / self.path.name))} .dump | "
                   f"sed 's/^ROLLBACK; -- due to errors$/COMMIT;/' | sqlite3 {here}")
        return CaptionStoreError(
            f"{self.path}: not a usable caption store ({reason}); lvr leaves it untouched. "
            f"Move it aside: mkdir {shlex.quote(str(aside))} && mv {here}* {shlex.quote(str(aside))}/ ; "
            f"then, to keep the captions it still holds: {salvage} ; "
            f"then rerun (captions not salvaged are asked for again)")

    def _check_integrity(self) -> None:
        """Refuse a damaged file before anything (the switch to WAL, the schema) writes to it."""
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            rows = conn.execute("PRAGMA quick_check(1)").fetchall()
        finally:
            conn.close()
        if rows != [("ok",)]:
            raise self._damaged(str(rows[0][0]) if rows else "quick_check gave no answer")

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise CaptionStoreError(f"{self.path}: caption store is closed")
        if os.getpid() != self._pid:
            # After a fork the parent's connections must not be touched (not
            # even closed); start afresh in the child.
            self._pid, self._local, self._conns = os.getpid(), threading.local(), []
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: autocommit, so each statement is its own short
        # transaction and no read transaction lingers between calls.
        # check_same_thread=False only so close() may close every thread's
        # connection; each connection is still used by one thread.
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            self._ensure_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")  # durable across crashes in WAL mode
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _ensure_wal(conn: sqlite3.Connection) -> None:
        # The switch to WAL needs a moment of exclusive access; processes that
        # open a brand-new file together can see "locked" here even with a
        # busy timeout, so retry until the deadline.
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as e:
                if ("locked" not in str(e) and "busy" not in str(e)) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='schema_version'").fetchone()
        if row is None:
            # BEGIN IMMEDIATE: only one process creates the schema; the others
            # wait, then find it there (IF NOT EXISTS) and write no second version row.
            conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in (_SCHEMA + ";" + _CLAIMS_SCHEMA).split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                if conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
                    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        version = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise CaptionStoreError(
                f"{self.path}: caption store schema version {version}, but this lvr reads "
                f"version {SCHEMA_VERSION}")
        cols = {r[1] for r in conn.execute("PRAGMA table_info(captions)")}
        if "digest" not in cols:
            raise CaptionStoreError(f"{self.path}: not a caption store (no captions table)")
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='claims'").fetchone() is None:
            conn.execute(_CLAIMS_SCHEMA)

    # -- reading --------------------------------------------------------------

    @staticmethod
    def _entry(row) -> CaptionEntry:
        (_digest, video_id, level, start, end, model, prompt_hash, settings,
         node_id, caption, meta) = row
        key = CaptionKey(video_id, level, start, end, model, prompt_hash, settings)
        return CaptionEntry(key, tuple(json.loads(node_id)), caption, json.loads(meta))

    def get(self, key: CaptionKey) -> CaptionEntry | None:
        with self._errors():
            row = self._conn().execute(f"SELECT {_COLUMNS} FROM captions WHERE digest = ?",
                                       (key.digest(),)).fetchone()
        return None if row is None else self._entry(row)

    def get_many(self, keys: Iterable[CaptionKey]) -> dict[str, CaptionEntry]:
        """Entries found, by digest. Missing keys are simply absent."""
        digests = list(dict.fromkeys(k.digest() for k in keys))
        out: dict[str, CaptionEntry] = {}
        with self._errors():
            conn = self._conn()
            for i in range(0, len(digests), BATCH):
                chunk = digests[i:i + BATCH]
                marks = ",".join("?" * len(chunk))
                for row in conn.execute(f"SELECT {_COLUMNS} FROM captions WHERE digest IN ({marks})", chunk):
                    out[row[0]] = self._entry(row)
        return out

    def entries(self, video_id: str | None = None, model: str | None = None) -> Iterator[CaptionEntry]:
        """All entries (optionally of one video and/or model), in insertion order.

        Read in pages so no read transaction stays open while the caller
        works through the results.
        """
        where, args = [], []
        if video_id is not None:
            where.append("video_id = ?")
            args.append(video_id)
        if model is not None:
            where.append("model = ?")
            args.append(model)
        cond = "".join(f" AND {w}" for w in where)
        last = 0
        while True:
            with self._errors():
                rows = self._conn().execute(
                    f"SELECT rowid, {_COLUMNS} FROM captions WHERE rowid > ?{cond} "
                    f"ORDER BY rowid LIMIT {BATCH}", [last, *args]).fetchall()
            if not rows:
                return
            for row in rows:
                yield self._entry(row[1:])
            last = rows[-1][0]

    def count(self) -> int:
        with self._errors():
            return self._conn().execute("SELECT COUNT(*) FROM captions").fetchone()[0]

    # -- writing --------------------------------------------------------------

    def put(self, key: CaptionKey, node_id: Iterable[int], caption: str, meta: dict | None = None) -> bool:
        """Store a caption unless the key already has one. True if this call stored it.

        First writer wins: a later put for the same key changes nothing, so
        two workers racing on one node never leave two rows.
        """
        if not isinstance(caption, str):
            raise ValueError("caption must be a string")
        node = [int(i) for i in node_id]
        meta = dict(meta or {})
        meta.setdefault("created_at", round(time.time(), 3))
        try:
            meta_json = json.dumps(meta, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"caption meta must be plain JSON ({e})") from None
        k = key
        with self._errors():
            cur = self._conn().execute(
                f"INSERT INTO captions ({_COLUMNS}, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT (digest) DO NOTHING",
                (k.digest(), k.video_id, k.level, k.start, k.end, k.model, k.prompt_hash,
                 k.frame_settings, json.dumps(node), caption, meta_json, time.time()))
            return cur.rowcount == 1

    # -- claims: one request per caption across processes ---------------------

    @asynccontextmanager
    async def claim(self, key: CaptionKey, ttl: float = CLAIM_TTL_S) -> AsyncIterator[CaptionEntry | None]:
        """Hold the right to make key's caption; wait while another process holds it.

        Yields the stored entry when there is (or, after waiting, comes to be)
        one: nothing to make. Otherwise yields None while holding a claim,
        renewed every ttl/3 seconds and released on exit, success or not; the
        holder stores the caption before leaving. A claim whose owner stops
        renewing it expires after ttl seconds and is taken over.
        """
        owner = f"{HOST}:{os.getpid()}:{secrets.token_hex(4)}"
        wait = CLAIM_POLL_S[0]
        while True:
            entry = self.get(key)
            if entry is None and self._take_claim(key, owner, ttl):
                # Checked again: the last holder may have stored it and let go
                # between the look above and the claim.
                entry = self.get(key)
                if entry is None:
                    break
                self._release_claim(key, owner)
            if entry is not None:
                yield entry
                return
            if not self._drop_claim_of_gone_owner(key):
                await asyncio.sleep(wait)
                wait = min(wait * 2, CLAIM_POLL_S[1])
        keeper = asyncio.create_task(self._keep_claim(key, owner, ttl))
        try:
            yield None
        finally:
            keeper.cancel()
            with suppress(CaptionStoreError):  # an unreleased claim just expires
                self._release_claim(key, owner)

    def _take_claim(self, key: CaptionKey, owner: str, ttl: float) -> bool:
        """One statement: claim the digest unless someone else holds a live claim."""
        now = time.time()
        with self._errors():
            cur = self._conn().execute(
                "INSERT INTO claims (digest, owner, expires) VALUES (?, ?, ?) "
                "ON CONFLICT (digest) DO UPDATE SET owner = excluded.owner, expires = excluded.expires "
                "WHERE claims.expires < ? OR claims.owner = excluded.owner",
                (key.digest(), owner, now + ttl, now))
            return cur.rowcount == 1

    async def _keep_claim(self, key: CaptionKey, owner: str, ttl: float) -> None:
        while True:
            await asyncio.sleep(ttl / 3)
            with suppress(CaptionStoreError):  # at worst the claim expires: a second request, no harm
                self._take_claim(key, owner, ttl)

    def _release_claim(self, key: CaptionKey, owner: str) -> None:
        with self._errors():
            self._conn().execute("DELETE FROM claims WHERE digest = ? AND owner = ?", (key.digest(), owner))

    def _drop_claim_of_gone_owner(self, key: CaptionKey) -> bool:
        """Remove key's claim if its owner is a process of this host that has ended (killed)."""
        with self._errors():
            row = self._conn().execute("SELECT owner FROM claims WHERE digest = ?", (key.digest(),)).fetchone()
            if row is None or not _owner_gone(row[0]):
                return False
            self._conn().execute("DELETE FROM claims WHERE digest = ? AND owner = ?", (key.digest(), row[0]))
        return True

    # -- lifetime -------------------------------------------------------------

    def close(self) -> None:
        """Close every thread's connection. Further calls raise CaptionStoreError."""
        with self._lock:
            conns, self._conns = self._conns, []
            self._closed = True
        if os.getpid() == self._pid:
            for conn in conns:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
        self._local = threading.local()

    def __enter__(self) -> "CaptionStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CaptionStore({str(self.path)!r})"


def _owner_gone(owner: str) -> bool:
    """True when a claim owner (host:pid:token) is a process of this host that no longer runs."""
    try:
        host, pid, _token = owner.rsplit(":", 2)
        pid = int(pid)
    except ValueError:
        return False
    if host != HOST or pid == os.getpid() or os.name != "posix":  # os.kill(pid, 0) is POSIX only
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, but another user's
        return False
    return False
