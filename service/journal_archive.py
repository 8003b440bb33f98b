"""The journal's long-term home, so Redis memory stays flat: entries older than JOURNAL_ARCHIVE_AFTER seconds
leave the Redis stream for append-only files (one JSON line per entry with its CRC32, fsynced before Redis
forgets them), and a balance checkpoint in Redis (what the archived entries add up to, per account) keeps
`reconcile` exact: checkpoint + live stream == balances, and the files replayed == the checkpoint.

The stream is trimmed in the same script that moves the checkpoint, only if no other archiver moved it
first; a batch written to the files but not committed (a crash, a lost race) is written again next time,
and readers skip ids they have seen (ids only grow)."""
from __future__ import annotations

import asyncio
import fcntl
import json
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, AsyncIterator, Iterator

from .ledger import Ledger, ReconcileReport
from .scripts import register

__all__ = ["JournalArchive", "Checkpoint", "ArchiveCorrupt", "entry_key", "load_checkpoint", "archive_once", "journal_entries",
           "verify_archive"]


class ArchiveCorrupt(Exception):
    """A line whose checksum does not match, or an archive that does not add up to the checkpoint."""


def entry_key(entry_id: str) -> tuple[int, int]:
    """A stream id as a comparable (ms, seq) pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class Checkpoint:
    """What the archived entries add up to: up to stream id `last`, per account [dp, cp, dpend, cpend]."""

    last: str = "0-0"
    counters: dict[str, list[int]] = field(default_factory=dict)
    opened: set[str] = field(default_factory=set)
    entries: int = 0

    @classmethod
    def from_redis(cls, row: dict[str, str]) -> "Checkpoint":
        if not row:
            return cls()
        return cls(row["last"], json.loads(row["counters"]), set(json.loads(row["opened"])), int(row["entries"]))


class JournalArchive:
    """Append-only files in `directory`, one per UTC day of the entries: `journal-YYYYMMDD.jsonl`."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def append(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        """Write and fsync (file and directory) before the caller lets Redis forget the entries."""
        self.directory.mkdir(parents=True, exist_ok=True)
        by_day: dict[str, list[str]] = {}
        for entry_id, e in entries:
            day = time.strftime("%Y%m%d", time.gmtime(entry_key(entry_id)[0] / 1000))
            line = json.dumps({"id": entry_id, "e": e}, sort_keys=True, separators=(",", ":"))
            by_day.setdefault(day, []).append(f"{line}\t{zlib.crc32(line.encode()):08x}\n")
        for day, lines in by_day.items():
            with open(self.directory / f"journal-{day}.jsonl", "a", encoding="utf-8") as f:
                f.writelines(lines)
                f.flush()
                os.fsync(f.fileno())
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, until: str | None = None) -> Iterator[tuple[str, dict[str, str]]]:
        """Every archived entry once, oldest first, up to stream id `until`; ArchiveCorrupt on a bad line."""
        seen = (0, -1)
        stop = entry_key(until) if until else None
        for path in sorted(self.directory.glob("journal-*.jsonl")):
            with open(path, encoding="utf-8") as f:
                for n, raw in enumerate(f, 1):
                    line, _, crc = raw.rstrip("\n").rpartition("\t")
                    if f"{zlib.crc32(line.encode()):08x}" != crc:
                        raise ArchiveCorrupt(f"{path.name}:{n}: checksum mismatch")
                    item = json.loads(line)
                    key = entry_key(item["id"])
                    if key <= seen:  # written twice (a batch retried after a crash or a lost race)
                        continue
                    if stop is not None and key > stop:
                        return
                    seen = key
                    yield item["id"], item["e"]

    def try_lock(self) -> IO[str] | None:
        """An exclusive lock on the directory (None if another process has it): processes of one host never
        interleave their lines. Closing the file releases it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        f = open(self.directory / ".lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
        return f


async def load_checkpoint(ledger: Ledger) -> Checkpoint:
    return Checkpoint.from_redis(await ledger.redis.hgetall(ledger.checkpoint_key))


async def archive_once(ledger: Ledger, archive: JournalArchive, older_than: float, batch: int = 5000,
                       batches: int = 20) -> int:
    """Move entries older than `older_than` seconds to the archive (up to `batches` x `batch` of them);
    returns how many. Skipped while another process of this host is archiving (its lock is taken)."""
    cutoff = str(int((time.time() - older_than) * 1000) - 1)
    if not await ledger.redis.xrange(ledger.journal_key, "-", cutoff, count=1):
        return 0  # nothing old enough (the disk is not touched)
    lock = archive.try_lock()
    if lock is None:
        return 0
    moved = 0
    try:
        for _ in range(batches):
            n = await _archive_batch(ledger, archive, older_than, batch)
            moved += n
            if n < batch:
                break
    finally:
        lock.close()
    return moved


async def _archive_batch(ledger: Ledger, archive: JournalArchive, older_than: float, batch: int) -> int:
    cp = await load_checkpoint(ledger)
    cutoff_ms = int((time.time() - older_than) * 1000)
    start = "-" if cp.last == "0-0" else "(" + cp.last
    entries = await ledger.redis.xrange(ledger.journal_key, start, str(cutoff_ms - 1), count=batch)
    if not entries:
        return 0
    await asyncio.to_thread(archive.append, entries)  # on disk (fsynced) before Redis forgets them
    previous = cp.last
    report = ReconcileReport()
    for _, e in entries:
        Ledger._apply_entry(e, cp.counters, cp.opened, report)
    ms, seq = entry_key(entries[-1][0])
    outcome = await register(ledger.redis, "journal_checkpoint")(
        keys=[ledger.checkpoint_key, ledger.journal_key],
        args=[previous, entries[-1][0], json.dumps(cp.counters), json.dumps(sorted(cp.opened)),
              cp.entries + len(entries), f"{ms}-{seq + 1}"])
    return len(entries) if outcome == "ok" else 0


async def journal_entries(ledger: Ledger, archive: JournalArchive | None) -> AsyncIterator[dict[str, str]]:
    """Every journal entry, oldest first: the archived ones (up to the checkpoint), then the live stream."""
    cp = await load_checkpoint(ledger)
    if cp.last != "0-0":
        if archive is None:
            raise ArchiveCorrupt(f"the journal was archived up to {cp.last}: configure JOURNAL_ARCHIVE_DIR to read it")
        for _, e in archive.read(cp.last):
            yield e
    start = "-" if cp.last == "0-0" else "(" + cp.last
    while True:
        entries = await ledger.redis.xrange(ledger.journal_key, start, "+", count=5000)
        for _, e in entries:
            yield e
        if len(entries) < 5000:
            return
        start = "(" + entries[-1][0]


async def verify_archive(ledger: Ledger, archive: JournalArchive) -> list[str]:
    """The files replayed from zero give exactly the checkpoint (counters, accounts opened, count, last id)."""
    cp = await load_checkpoint(ledger)
    counters: dict[str, list[int]] = {}
    opened: set[str] = set()
    report = ReconcileReport()
    count, last = 0, "0-0"
    try:
        for entry_id, e in archive.read(cp.last):
            Ledger._apply_entry(e, counters, opened, report)
            count, last = count + 1, entry_id
    except ArchiveCorrupt as exc:
        return [f"archive: {exc}"]
    problems = [f"archive: {m}" for m in report.mismatches]
    if (counters, opened, count, last) != (cp.counters, cp.opened, cp.entries, cp.last):
        problems.append(f"archive: {count} entries up to {last} do not add up to the checkpoint "
                        f"({cp.entries} entries up to {cp.last})")
    return problems
