"""The journal leaves Redis for checksummed files, in order, and `reconcile` stays exact: the archive's
checkpoint + the live stream == the balances (sum zero), and the files replayed == the checkpoint."""
from __future__ import annotations

import asyncio

from service.journal_archive import JournalArchive, archive_once, journal_entries, load_checkpoint, verify_archive
from service.ledger import GRANTS, REVENUE, AccountKind, Hold, user_account


async def _traffic(ledger, tag: str) -> None:
    for name in ("a", "b"):
        await ledger.open_account(user_account(f"{tag}{name}"), AccountKind.USER)
        await ledger.post(f"grant-{tag}{name}", GRANTS, user_account(f"{tag}{name}"), 1000)
    for i in range(5):
        await ledger.hold(f"bt_{tag}{i}", user_account(f"{tag}a"), REVENUE, 10, timeout=30)
        hold = Hold(f"bt_{tag}{i}", user_account(f"{tag}a"), REVENUE, 10)
        await (ledger.capture(hold) if i % 2 else ledger.void(hold))
    await ledger.hold(f"bt_{tag}pending", user_account(f"{tag}b"), REVENUE, 7, timeout=30)  # left pending


async def test_archived_journal_reconciles_exactly_and_replays_to_its_checkpoint(ledger, tmp_path):
    archive = JournalArchive(tmp_path / "journal")
    await _traffic(ledger, "x")
    before = await ledger.redis.xlen(ledger.journal_key)
    await asyncio.sleep(0.01)
    moved = await archive_once(ledger, archive, older_than=0)
    assert moved == before and await ledger.redis.xlen(ledger.journal_key) == 0  # out of Redis
    await _traffic(ledger, "y")  # more entries, live
    report = await ledger.reconcile()
    assert report.ok, report.mismatches
    assert report.archived_entries == moved and report.journal_entries == await ledger.redis.xlen(ledger.journal_key)
    assert report.sum_posted == 0 and report.sum_pending == 0
    assert await verify_archive(ledger, archive) == []
    ledger.archive_dir = archive.directory
    assert sum([1 async for _ in journal_entries(ledger, archive)]) == report.archived_entries + report.journal_entries
    # a second pass moves the rest; a batch written twice (a crash before its commit) is read once
    await asyncio.sleep(0.01)
    cp = await load_checkpoint(ledger)
    archive.append(list(await ledger.redis.xrange(ledger.journal_key, "(" + cp.last, "+")))
    assert await archive_once(ledger, archive, older_than=0) > 0
    assert (await ledger.reconcile()).ok and await verify_archive(ledger, archive) == []


async def test_a_damaged_archive_line_is_reported(ledger, tmp_path):
    archive = JournalArchive(tmp_path / "journal")
    await _traffic(ledger, "z")
    await asyncio.sleep(0.01)
    assert await archive_once(ledger, archive, older_than=0) > 0
    path = next(archive.directory.glob("journal-*.jsonl"))
    path.write_text(path.read_text().replace('"amount":"10"', '"amount":"11"', 1))
    assert "checksum mismatch" in (await verify_archive(ledger, archive))[0]
    assert (await ledger.reconcile()).ok  # the live books do not depend on reading the files


async def test_entries_younger_than_the_limit_stay_in_redis(ledger, tmp_path):
    await _traffic(ledger, "w")
    assert await archive_once(ledger, JournalArchive(tmp_path / "j"), older_than=3600) == 0
    assert (await ledger.reconcile()).archived_entries == 0


async def test_the_reconcile_command_checks_the_archive_files(ledger, settings, tmp_path):
    """`python -m service reconcile` counts archived entries and fails when a file no longer adds up."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    var = tmp_path / "var"
    await _traffic(ledger, "c")
    await asyncio.sleep(0.01)
    assert await archive_once(ledger, JournalArchive(var / "journal"), older_than=0) > 0
    env = {**os.environ, "REDIS_URL": settings.redis_url, "REDIS_PREFIX": settings.redis_prefix,
           "MICROTASKS_VAR": str(var)}

    def reconcile() -> tuple[int, dict]:
        out = subprocess.run([sys.executable, "-m", "service", "reconcile"], env=env, capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent.parent, timeout=60)
        return out.returncode, json.loads(out.stdout)

    rc, report = reconcile()
    assert rc == 0 and report["ok"] and report["archived_entries"] > 0, report
    path = next((var / "journal").glob("journal-*.jsonl"))
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))  # the last entry lost
    rc, report = reconcile()
    assert rc == 1 and "do not add up to the checkpoint" in report["mismatches"][0], report
