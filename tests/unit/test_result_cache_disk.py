"""The result cache's disk tier without a mesh, on real SQLite files in a temporary directory: bounded in
bytes with LRU eviction, a TTL, kept across a reopen, files it cannot trust (truncated, random bytes,
another application's, another format version, a tampered value) never served and never fatal, a
database that breaks while open turning the tier off, and a path it cannot write refused at start."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sqlite3
import threading
import time

import pytest
from prometheus_client import REGISTRY

from services.common.config_flags import add_config_args, config_from_args
from services.router.config import RouterConfig
from services.router.result_cache import ResultCache
from services.router.result_cache_disk import APPLICATION_ID, DISK_TIMEOUT_S, DiskStore, DiskTier
from tests.unit.test_result_cache import answer

NOW = 1_800_000_000.0
KIB = 1 << 10


def unregister_cache_metrics() -> None:
    for collector in list(REGISTRY._collector_to_names):
        if any(n.startswith("meshserve_result_cache") for n in REGISTRY._collector_to_names[collector]):
            REGISTRY.unregister(collector)


@pytest.fixture(autouse=True)
def fresh_registry():
    yield
    unregister_cache_metrics()


def opened(path, max_bytes: int = 1 << 20, ttl_s: float = 3600) -> DiskStore:
    store = DiskStore(path, max_bytes, ttl_s)
    store.open()
    return store


def value(i: int, size: int = 8 * KIB) -> bytes:
    return os.urandom(size - 8) + i.to_bytes(8, "big")  # incompressible, so pages are really used


def test_an_answer_survives_closing_and_reopening_the_file(tmp_path):
    store = opened(tmp_path / "cache.db")
    store.put("k", b"answer", NOW)
    store.close()
    assert not (tmp_path / "cache.db-wal").exists()  # checkpointed into the file on close
    reopened = opened(tmp_path / "cache.db")
    assert reopened.get("k", NOW + 1) == b"answer"
    assert reopened.get("other", NOW + 1) is None
    assert reopened.moved_aside is None


def test_the_least_recently_used_answers_are_evicted_past_the_bound_in_bytes(tmp_path):
    store = opened(tmp_path / "cache.db", max_bytes=256 * KIB)
    for i in range(20):
        store.put(f"k{i}", value(i), NOW + i)
    assert store.count() == 20  # 160 KiB of answers fit
    assert store.get("k0", NOW + 20) is not None  # k0 is now the most recently used
    for i in range(20, 40):
        store.put(f"k{i}", value(i), NOW + 21 + i)
    assert store.used_bytes <= store.max_bytes
    assert store.get("k0", NOW + 100) is not None
    assert store.get("k1", NOW + 100) is None  # the least recently used went first
    assert store.get("k39", NOW + 100) is not None
    assert store.count() < 40


def test_a_lower_bound_on_reopen_evicts_down_to_it(tmp_path):
    store = opened(tmp_path / "cache.db", max_bytes=1 << 20)
    for i in range(40):
        store.put(f"k{i}", value(i), NOW + i)
    store.close()
    smaller = opened(tmp_path / "cache.db", max_bytes=128 * KIB)
    assert smaller.used_bytes <= 128 * KIB
    assert smaller.get("k39", NOW + 50) is not None and smaller.get("k0", NOW + 50) is None


def test_an_answer_too_large_for_the_bound_is_not_stored(tmp_path):
    store = opened(tmp_path / "cache.db", max_bytes=128 * KIB)
    store.put("big", value(0, 64 * KIB), NOW)
    assert store.get("big", NOW) is None


def test_an_expired_answer_is_a_miss_and_is_purged(tmp_path):
    store = opened(tmp_path / "cache.db", ttl_s=60)
    store.put("old", b"a", NOW)
    store.put("older", b"b", NOW - 30)
    assert store.get("old", NOW + 59) == b"a"
    assert store.get("old", NOW + 60) is None
    assert store.count() == 1  # the expired lookup deleted it
    store.put("new", b"c", NOW + 61)  # a store purges what expired meanwhile
    assert store.count() == 1 and store.get("new", NOW + 61) == b"c"


def damaged_cache(path) -> None:
    store = opened(path)
    for i in range(40):
        store.put(f"k{i}", value(i), NOW)
    store.close()


def foreign_database(path) -> None:
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA application_id={APPLICATION_ID + 1}")
    db.execute("CREATE TABLE notes (text TEXT)")
    db.execute("INSERT INTO notes VALUES ('someone else''s')")
    db.commit()
    db.close()


def older_format(path) -> None:
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA application_id={APPLICATION_ID}")
    db.execute("PRAGMA user_version=0")
    db.execute("CREATE TABLE answers (key BLOB PRIMARY KEY, value BLOB)")
    db.commit()
    db.close()


def truncate(path) -> None:
    damaged_cache(path)
    with open(path, "r+b") as file:
        file.truncate(os.path.getsize(path) // 2 + 1000)  # mid-page


def truncate_to_whole_pages(path) -> None:
    damaged_cache(path)
    with open(path, "r+b") as file:
        file.truncate(os.path.getsize(path) // 2 // 4096 * 4096)


def truncate_inside_the_header(path) -> None:
    damaged_cache(path)
    with open(path, "r+b") as file:
        file.truncate(50)


def random_bytes(path) -> None:
    path.write_bytes(os.urandom(10_000))


@pytest.mark.parametrize(
    "spoil, problem",
    [
        (truncate, "truncated"),
        (truncate_inside_the_header, "truncated"),
        (truncate_to_whole_pages, "unreadable|damaged"),  # which, depends on the page the check reads first
        (random_bytes, "not a SQLite database"),
        (foreign_database, "another application's"),
        (older_format, "format version 0"),
    ],
)
def test_a_file_it_cannot_trust_is_moved_aside_with_one_warning_and_a_fresh_one_serves(
    tmp_path, caplog, spoil, problem
):
    path = tmp_path / "cache.db"
    spoil(path)
    before = path.read_bytes()
    with caplog.at_level(logging.WARNING):
        store = opened(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and re.search(problem, warnings[0]) and "moved it to" in warnings[0], warnings
    assert store.moved_aside is not None and store.moved_aside.read_bytes() == before  # kept, not deleted
    assert store.get("k0", NOW) is None  # nothing of the old file is served
    store.put("k", b"fresh", NOW)
    assert store.get("k", NOW) == b"fresh"
    store.close()
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        assert opened(path).moved_aside is None  # the fresh file is trusted next time
    assert not caplog.records


def test_an_empty_file_is_an_empty_cache(tmp_path):
    (tmp_path / "cache.db").write_bytes(b"")
    store = opened(tmp_path / "cache.db")
    assert store.moved_aside is None and store.count() == 0


def test_a_tampered_value_is_deleted_and_never_served(tmp_path, caplog):
    path = tmp_path / "cache.db"
    store = opened(path)
    store.put("k", b"the real answer", NOW)
    store.put("j", b"another", NOW)
    other = sqlite3.connect(path)
    other.execute("UPDATE answers SET value = ? WHERE key = ?", (b"a forged answer", b"k"))
    other.commit()
    other.close()
    with caplog.at_level(logging.WARNING):
        assert store.get("k", NOW) is None
    assert "digest" in caplog.text
    assert store.count() == 1 and store.get("j", NOW) == b"another"


async def test_the_result_cache_answers_from_disk_after_a_restart(tmp_path):
    path = tmp_path / "cache.db"
    cache = ResultCache("m", max_bytes=1 << 20, disk=DiskStore(path, 1 << 20, 3600))
    await cache.open()
    await cache.put("k", answer())
    await cache.close()  # waits for the background store
    unregister_cache_metrics()  # the restarted router registers its own
    restarted = ResultCache("m", max_bytes=1 << 20, disk=DiskStore(path, 1 << 20, 3600))
    await restarted.open()
    assert await restarted.get("k") == (answer(), "disk")
    assert await restarted.get("k") == (answer(), "memory")  # a disk hit is kept in memory
    assert restarted.hits.labels("m", "disk")._value.get() == 1
    assert REGISTRY.get_sample_value("meshserve_result_cache_disk_bytes", {"model_name": "m"}) > 0
    await restarted.close()


async def test_an_undecodable_disk_value_is_a_miss_and_is_dropped(tmp_path, caplog):
    path = tmp_path / "cache.db"
    store = opened(path)
    store.put("k", b'{"deltas": "not a list"}', NOW)  # a valid digest over a value no version decodes
    store.close()
    cache = ResultCache("m", max_bytes=1 << 20, disk=DiskStore(path, 1 << 20, 3600))
    await cache.open()
    with caplog.at_level(logging.WARNING):
        assert await cache.get("k") is None
    assert "does not decode" in caplog.text
    assert cache.misses._value.get() == 1
    await cache.close()
    assert opened(path).count() == 0


async def test_a_database_broken_while_open_turns_the_tier_off_and_memory_still_serves(tmp_path, caplog):
    path = tmp_path / "cache.db"
    damaged_cache(path)
    cache = ResultCache("m", max_bytes=1 << 20, disk=DiskStore(path, 1 << 20, 3600))
    await cache.open()
    await cache.put("mine", answer("kept"))
    assert cache.disk is not None
    # so the next lookups read the file, not cached pages (on the tier's thread, which owns the connection)
    cache.disk._executor.submit(cache.disk.store.db.execute, "PRAGMA cache_size=1").result()
    with open(path, "r+b") as file:
        file.truncate(8192)
    with caplog.at_level(logging.WARNING):
        assert await cache.get("k5") is None
        assert await cache.get("k6") is None
    assert sum("turned it off" in r.getMessage() for r in caplog.records) == 1
    assert not cache.disk.usable
    assert await cache.get("mine") == (answer("kept"), "memory")
    await cache.close()


async def test_a_locked_database_rests_the_tier_with_one_warning(tmp_path, caplog):
    path = tmp_path / "cache.db"
    tier = DiskTier(DiskStore(path, 1 << 20, 3600))
    await tier.open()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another process writing: this router's store waits, then gives up
    with caplog.at_level(logging.WARNING):
        tier.put("k", b"v")
        tier.put("j", b"v")
        await tier.close()
    other.execute("ROLLBACK")
    other.close()
    assert [r.getMessage() for r in caplog.records if "disk store failed" in r.getMessage()] != []
    assert sum("disk store failed" in r.getMessage() for r in caplog.records) == 1
    assert not any("turned it off" in r.getMessage() for r in caplog.records)


def router_config(*flags: str) -> RouterConfig:
    parser = argparse.ArgumentParser()
    add_config_args(parser, RouterConfig)
    return config_from_args(RouterConfig, parser.parse_args(list(flags)))


def test_a_path_it_cannot_write_stops_the_router_with_one_sentence_naming_the_flag(tmp_path):
    # /sys refuses new files even to root, for whom permission bits would not
    for path, reason in [
        ("/sys/meshserve-cache.db", "is not writable"),
        (str(tmp_path / "missing" / "cache.db"), "does not exist"),
        (str(tmp_path), "is a directory"),
        ("", "is empty"),
    ]:
        with pytest.raises(SystemExit) as stopped:
            router_config(f"--result-cache-disk={path}")
        message = str(stopped.value)
        assert message.startswith(f"--result-cache-disk {path}".strip()) and reason in message
        assert "\n" not in message
    assert router_config(f"--result-cache-disk={tmp_path / 'cache.db'}").result_cache_disk_mb == 1024
    assert not (tmp_path / "cache.db").exists()  # checking creates nothing


def test_the_disk_tier_flags_are_checked():
    for flags, flag in [
        (["--result-cache-disk-mb=0"], "--result-cache-disk-mb"),
        (["--result-cache-disk-ttl-s=0"], "--result-cache-disk-ttl-s"),
        (["--result-cache-mb=0", "--result-cache-disk=/tmp/x.db"], "--result-cache-disk needs the memory tier"),
    ]:
        with pytest.raises(SystemExit, match=flag):
            router_config(*flags)


async def test_a_slow_disk_costs_a_lookup_at_most_its_bound_and_rests_the_tier(tmp_path, caplog):
    tier = DiskTier(DiskStore(tmp_path / "cache.db", 1 << 20, 3600))
    await tier.open()
    tier.put("k", b"v")
    release = threading.Event()
    tier._executor.submit(release.wait, 10)  # the tier's one thread stuck, as on a disk that does not answer
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert await tier.get("k") is None
    assert time.monotonic() - started < DISK_TIMEOUT_S + 0.5
    assert "too slow" in caplog.text and not tier.usable  # resting: the next lookups do not queue behind it
    release.set()
    await tier.close()
