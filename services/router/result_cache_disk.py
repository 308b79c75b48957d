"""The result cache's disk tier: answers kept in a local SQLite file across router restarts.

`DiskStore` is the file itself, synchronous and used from one thread: SQLite in WAL mode with
`synchronous=NORMAL` (a crash or power loss may lose the last commits, never corrupt the file), one
table of answers with a BLAKE2b digest of each value, bounded in bytes (the database's pages in use;
least recently used answers are evicted in batches past the bound) and with a TTL (an expired answer is
a miss and is purged). The file says what it is in its header (`application_id`, `user_version`), so on
open a file that is not a SQLite database, belongs to another application or format version, or fails
`PRAGMA quick_check` is renamed aside with one warning and a fresh database starts; a value whose digest
does not match is deleted and is a miss, never served. Several routers on one host may share a file
(WAL allows it; an advisory lock serialises the check on open); the deploys give each router its own.

`DiskTier` puts the store behind the event loop: every call runs on the tier's own single thread (so
writes stay in order), a lookup waits at most `DISK_TIMEOUT_S`, a store is not waited for at all, and a
slow or busy disk leaves the tier alone for `DISK_RETRY_AFTER_S` (logged once). A database that turns
unreadable while the router runs turns the tier off with a warning; the router keeps serving from memory,
Redis and the replicas.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import hashlib
import logging
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

APPLICATION_ID = 0x4D534843
"""`PRAGMA application_id` of a meshserve result cache ("MSHC")."""
FORMAT_VERSION = 1
"""`PRAGMA user_version`: the table's layout. A file of another version is moved aside, not migrated."""
SQLITE_MAGIC = b"SQLite format 3\x00"
DISK_TIMEOUT_S = 0.2
"""A disk lookup slower than this counts as a failure: the answer comes from Redis or is generated."""
DISK_RETRY_AFTER_S = 5.0
"""After a slow or busy disk, this long without trying it again."""
MAX_PENDING = 64
"""Calls queued on the tier's thread beyond which lookups miss and stores are dropped."""
EVICT_BATCH = 16
PURGE_EVERY_S = 60.0
WAL_LIMIT_BYTES = 4 << 20
"""The write-ahead log is truncated back to this after a checkpoint."""
_TRANSIENT = {5, 6, 13}  # SQLITE_BUSY, SQLITE_LOCKED, SQLITE_FULL: this call fails, the file is fine

SCHEMA = """
CREATE TABLE answers (
    key BLOB PRIMARY KEY,
    value BLOB NOT NULL,
    digest BLOB NOT NULL,
    size INTEGER NOT NULL,
    stored_at REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE INDEX answers_last_used ON answers (last_used);
CREATE INDEX answers_stored_at ON answers (stored_at);
"""


def digest(value: bytes) -> bytes:
    return hashlib.blake2b(value, digest_size=16).digest()


def check_disk_path(path: str, flag: str = "--result-cache-disk") -> None:
    """Raises ValueError, naming `flag`, unless the cache file at `path` can be created and written
    (its directory must be writable too: SQLite keeps its -wal and -shm files beside it)."""
    if not path.strip():
        raise ValueError(f"{flag} is empty; give the path of the cache's file")
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give the path of the cache's file inside it")
    directory = target.parent
    if not directory.is_dir():
        raise ValueError(f"{flag} {path}: the directory {directory} does not exist")
    try:  # os.access answers for the user, not for a read-only mount or root: try it
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".meshserve-probe-")
        os.close(fd)
        os.unlink(probe)
        if target.exists():
            with open(target, "r+b"):
                pass
    except OSError as error:
        raise ValueError(f"{flag} {path} is not writable ({error.strerror})") from None


class DiskStore:
    """The SQLite file. Not thread-safe: one thread opens it and makes every call (`DiskTier`'s)."""

    def __init__(self, path: Path, max_bytes: int, ttl_s: float) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.used_bytes = 0
        """Bytes of the database's pages in use, as of the last call (read by the metrics thread)."""
        self.moved_aside: Path | None = None
        """Where an unusable file found on open was moved to."""
        self._db: sqlite3.Connection | None = None
        self._last_purge = 0.0

    # -- opening -----------------------------------------------------------------------------------

    def open(self) -> None:
        """Opens the file, moving an unusable one aside first (one warning), and evicts down to the bound."""
        with self._open_lock():
            problem = self._problem()
            if problem is not None:
                self._move_aside(problem)
            db = self._connect()
            try:
                if db.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                    self._create(db)
                db.execute("PRAGMA journal_mode=WAL")
            except BaseException:
                db.close()
                raise
        self._db = db
        now = time.time()
        with self._transaction():
            self._purge(now)
            self._evict()
        self._measure()

    @contextlib.contextmanager
    def _open_lock(self) -> Iterator[None]:
        """Routers sharing a file check it one at a time, so one never moves aside a file another just made."""
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _problem(self) -> str | None:
        """Why the file at `path` may not be used, or None (absent, empty, or a valid cache of this format)."""
        try:
            with open(self.path, "rb") as file:
                header = file.read(len(SQLITE_MAGIC))
        except FileNotFoundError:
            return None
        if not header:
            return None  # an empty file is an empty database
        if header != SQLITE_MAGIC:
            return "not a SQLite database"
        size = self.path.stat().st_size
        with open(self.path, "rb") as file:
            page_size = int.from_bytes(file.read(100)[16:18], "big") or 0
        page_size = 65536 if page_size == 1 else page_size  # the header's encoding of the largest size
        if size < 100 or not page_size or size % page_size:
            return f"truncated ({size} bytes)"
        try:
            db = sqlite3.connect(f"file:{self.path}?mode=rw", uri=True, isolation_level=None, timeout=5)
            try:
                application_id = db.execute("PRAGMA application_id").fetchone()[0]
                if application_id != APPLICATION_ID:
                    return f"another application's SQLite database (application_id {application_id:#x})"
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version != FORMAT_VERSION:
                    return f"format version {version}, this router writes {FORMAT_VERSION}"
                check = [row[0] for row in db.execute("PRAGMA quick_check(3)")]
                if check != ["ok"]:
                    return f"damaged ({'; '.join(check)})"
            finally:
                db.close()
        except sqlite3.DatabaseError as error:
            return f"unreadable ({error})"
        return None

    def _move_aside(self, problem: str) -> None:
        aside = self.path.with_name(f"{self.path.name}.unusable-{time.strftime('%Y%m%dT%H%M%S')}")
        # a stale write-ahead log would be replayed into the fresh database: it goes with its file
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self.path}{suffix}")
            if source.exists():
                source.rename(f"{aside}{suffix}")
        self.moved_aside = aside
        log.warning(
            "result cache: the disk tier's file %s is %s; moved it to %s and started a fresh one",
            self.path,
            problem,
            aside,
        )

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, timeout=DISK_TIMEOUT_S / 2)
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        return db

    @staticmethod
    def _create(db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        db.execute(f"PRAGMA application_id={APPLICATION_ID}")
        db.execute(f"PRAGMA user_version={FORMAT_VERSION}")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute("COMMIT")

    # -- answers -----------------------------------------------------------------------------------

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "DiskStore.open() first"
        return self._db

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def get(self, key: str, now: float) -> bytes | None:
        """The value stored under `key`, or None: absent, expired, or failing its digest (then deleted,
        with a warning)."""
        row = self.db.execute("SELECT value, digest, stored_at FROM answers WHERE key = ?", (key.encode(),)).fetchone()
        if row is None:
            return None
        value, expected, stored_at = row
        if stored_at <= now - self.ttl_s:
            self.discard(key)
            return None
        if digest(value) != expected:
            log.warning("result cache: a disk entry failed its digest check; deleted it (key …%s)", key[-12:])
            self.discard(key)
            return None
        self.db.execute("UPDATE answers SET last_used = ? WHERE key = ?", (now, key.encode()))
        return bytes(value)

    def put(self, key: str, value: bytes, now: float) -> None:
        """Stores `value` under `key` (one too large for a quarter of the bound is not stored), then purges
        expired answers (once a minute) and evicts the least recently used past the bound."""
        if len(value) > self.max_bytes // 4:
            return
        with self._transaction() as db:
            db.execute(
                "INSERT INTO answers (key, value, digest, size, stored_at, last_used) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, digest = excluded.digest, "
                "size = excluded.size, stored_at = excluded.stored_at, last_used = excluded.last_used",
                (key.encode(), value, digest(value), len(value), now, now),
            )
            if now - self._last_purge >= PURGE_EVERY_S:
                self._purge(now)
            self._evict()
        self._measure()

    def discard(self, key: str) -> None:
        self.db.execute("DELETE FROM answers WHERE key = ?", (key.encode(),))
        self._measure()

    def _pages_in_use_bytes(self) -> int:
        page_count = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        page_size = self.db.execute("PRAGMA page_size").fetchone()[0]
        return int((page_count - free) * page_size)

    def _purge(self, now: float) -> None:
        self.db.execute("DELETE FROM answers WHERE stored_at <= ?", (now - self.ttl_s,))
        self._last_purge = now

    def _evict(self) -> int:
        """Deletes least recently used answers in batches until the pages in use fit the bound."""
        evicted = 0
        while self._pages_in_use_bytes() > self.max_bytes:
            deleted = self.db.execute(
                "DELETE FROM answers WHERE key IN (SELECT key FROM answers ORDER BY last_used LIMIT ?)",
                (EVICT_BATCH,),
            ).rowcount
            if not deleted:
                break  # nothing left to evict: the bound is below the empty database's size
            evicted += deleted
        return evicted

    def _measure(self) -> None:
        self.used_bytes = self._pages_in_use_bytes()

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        if self._db is not None:
            self._db.close()  # the last connection checkpoints the log into the file and removes it
            self._db = None


class DiskTier:
    """A `DiskStore` used from the event loop without ever blocking it (see the module docstring)."""

    def __init__(self, store: DiskStore) -> None:
        self.store = store
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="result-cache-disk")
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._lock = threading.Lock()
        self._off = True  # until open() succeeds
        self._resting_until = 0.0

    @property
    def used_bytes(self) -> int:
        return self.store.used_bytes

    @property
    def usable(self) -> bool:
        return not self._off and time.monotonic() >= self._resting_until and len(self._pending) < MAX_PENDING

    async def open(self) -> None:
        """Opens the file on the tier's thread (a check of a large file takes a while, so no short bound);
        a file that cannot be opened at all leaves the tier off, with a warning."""
        try:
            await asyncio.wrap_future(self._submit(self.store.open))
        except Exception as error:
            log.warning(
                "result cache: cannot open the disk tier at %s (%s: %s); caching without it",
                self.store.path,
                type(error).__name__,
                error,
            )
            return
        self._off = False

    async def get(self, key: str) -> bytes | None:
        if not self.usable:
            return None
        future = self._submit(self.store.get, key, time.time())
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), DISK_TIMEOUT_S)
        except Exception as error:
            self._failed("lookup", error)
            return None

    def put(self, key: str, value: bytes) -> None:
        """Queues the store and returns at once: the stream never waits for the disk."""
        self._background(self.store.put, key, value, time.time())

    def discard(self, key: str) -> None:
        self._background(self.store.discard, key)

    def _background(self, call: Callable[..., Any], *args: Any) -> None:
        if not self.usable:
            return
        future = self._submit(call, *args)
        loop = asyncio.get_running_loop()

        def settled(done: concurrent.futures.Future[Any]) -> None:
            if not done.cancelled() and done.exception() is not None:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing left to tell
                    loop.call_soon_threadsafe(self._failed, "store", done.exception())

        future.add_done_callback(settled)

    def _submit(self, call: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        future = self._executor.submit(call, *args)
        with self._lock:
            self._pending.add(future)

        def forget(done: concurrent.futures.Future[Any]) -> None:
            with self._lock:
                self._pending.discard(done)

        future.add_done_callback(forget)
        return future

    def _failed(self, what: str, error: BaseException | None) -> None:
        if self._off:
            return
        code = getattr(error, "sqlite_errorcode", None)
        if isinstance(error, TimeoutError) or (
            isinstance(error, sqlite3.OperationalError) and code is not None and code & 0xFF in _TRANSIENT
        ):
            if time.monotonic() >= self._resting_until:
                log.warning(
                    "result cache: disk %s failed (%s); using the other tiers alone for %.0f s",
                    what,
                    "too slow" if isinstance(error, TimeoutError) else error,
                    DISK_RETRY_AFTER_S,
                )
            self._resting_until = time.monotonic() + DISK_RETRY_AFTER_S
            return
        self._off = True
        log.warning(
            "result cache: the disk tier at %s failed (%s: %s); turned it off until the router restarts",
            self.store.path,
            type(error).__name__,
            error,
        )

    async def close(self) -> None:
        """Lets queued stores finish (for a while), then closes the file."""
        with self._lock:
            pending = list(self._pending)
        if pending:
            await asyncio.wait([asyncio.wrap_future(f) for f in pending], timeout=10)
        with contextlib.suppress(Exception):
            await asyncio.wrap_future(self._submit(self.store.close))
        self._executor.shutdown(wait=False)
