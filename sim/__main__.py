"""python -m sim [--seed N] [--ops N] [--max-seconds S] [--off KIND,...] [--skip INVARIANT,...]"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .ops import DEFAULT_OFF, FAULTS, MODIFIERS, OPS, OpSource
from .runner import Config, Sim, Violation, new_seed


async def run_once(cfg: Config, indices, deadline: float | None = None, keep: bool = False) -> tuple[Sim, Violation | None]:
    tmp = Path(tempfile.mkdtemp(prefix=f"sim-{cfg.seed}-"))
    sim = Sim(cfg, tmp)
    violation = None
    try:
        await sim.start()
        await sim.run(indices, deadline=deadline)
    except Violation as v:
        violation = v
    finally:
        await sim.stop()
        if violation is None and not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    sim.violation = violation  # type: ignore[attr-defined]
    return sim, violation


async def shrink(cfg: Config, failing: list[int], invariant: str, budget: float) -> list[int]:
    """Delta debugging over the op log: drop chunks while the same invariant still fails."""
    deadline = time.monotonic() + budget
    current, n, runs = failing, 2, 0

    async def fails(candidate: list[int]) -> bool:
        nonlocal runs
        runs += 1
        _, v = await run_once(cfg, candidate)
        return v is not None and v.invariant == invariant

    while len(current) >= 2 and time.monotonic() < deadline:
        size = max(1, len(current) // n)
        chunks = [current[k:k + size] for k in range(0, len(current), size)]
        progressed = False
        for chunk in chunks:
            if time.monotonic() >= deadline:
                break
            candidate = [i for i in current if i not in set(chunk)]
            if candidate and await fails(candidate):
                current, n, progressed = candidate, max(n - 1, 2), True
                print(f"  shrink: {len(current)} ops still fail ({runs} replays)", file=sys.stderr, flush=True)
                break
        if not progressed:
            if n >= len(current):
                break
            n = min(n * 2, len(current))
    return current


def ranges(indices: list[int]) -> str:
    """0,1,2,3,7 -> 0-3,7 (the --replay syntax)."""
    out: list[str] = []
    for i in indices:
        if out and "-" in out[-1] and int(out[-1].split("-")[1]) == i - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        elif out and "-" not in out[-1] and int(out[-1]) == i - 1:
            out[-1] = f"{out[-1]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out)


def parse_ranges(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _csv(value: str) -> set[str]:
    return {v.strip() for v in value.split(",") if v.strip()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim", description=__doc__)
    p.add_argument("--seed", type=int, default=None, help="default: a random one (printed)")
    p.add_argument("--ops", type=int, default=10_000, help="ops to run (the log's length)")
    p.add_argument("--max-seconds", type=float, default=None, help="stop issuing ops after this many seconds")
    p.add_argument("--off", type=_csv, default=set(),
                   help=f"op, fault or modifier kinds switched off; ops: {','.join(OPS)}; faults: "
                        f"{','.join(FAULTS)}; modifiers: {','.join(MODIFIERS)}")
    p.add_argument("--only", type=_csv, default=None, help="run only these op/fault kinds")
    p.add_argument("--weights", default="", help="kind=weight,... over the default weights (e.g. redis_pause=2)")
    p.add_argument("--skip", type=_csv, default=set(), help="invariants not checked")
    p.add_argument("--replay", default=None, help="op indices to run instead of 0..ops-1 (e.g. 0-99,140,200-210)")
    p.add_argument("--check-every", type=int, default=250)
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--lanes", type=int, default=4, help="concurrent lanes of ops (each with its own users)")
    p.add_argument("--shrink-seconds", type=float, default=600, help="time budget to shrink a failing log (0: off)")
    p.add_argument("--plant", type=int, default=None, help=argparse.SUPPRESS)  # self-test: a bug at this op
    p.add_argument("--json", action="store_true", help="also print the summary as one JSON line")
    args = p.parse_args(argv)

    seed = args.seed if args.seed is not None else new_seed()
    kinds = (args.only if args.only is not None else (set(OPS) | set(FAULTS)) - DEFAULT_OFF) - args.off
    cfg = Config(seed=seed, kinds=kinds, modifiers=set(MODIFIERS) - args.off, skip=args.skip,
                 servers=args.servers, lanes=args.lanes, check_every=args.check_every, plant=args.plant,
                 weights={k: float(v) for k, v in (item.split("=") for item in _csv(args.weights))})
    indices = parse_ranges(args.replay) if args.replay else range(args.ops)
    deadline = time.monotonic() + args.max_seconds if args.max_seconds else None
    print(f"sim: seed {seed}, {len(indices)} ops, kinds {','.join(sorted(kinds))}, "
          f"modifiers {','.join(sorted(cfg.modifiers)) or '-'}, skipped invariants {','.join(sorted(cfg.skip)) or '-'}",
          flush=True)
    started = time.monotonic()
    sim, violation = asyncio.run(run_once(cfg, indices, deadline, keep=True))
    elapsed = time.monotonic() - started
    faults = dict(sorted(sim.fault_counts.items()))
    summary = {"seed": seed, "ops": sim.ops_done, "seconds": round(elapsed, 1),
               "ops_per_s": round(sim.ops_done / elapsed, 1) if elapsed else 0, "faults": faults,
               "ops_by_kind": dict(sorted(sim.op_counts.items())), "statuses": dict(sorted(sim.statuses.items())),
               "checkpoints": sim.checkpoints, "reconciles": sim.reconciles, "served": sim.model.served,
               "sat_moved": sim.model.moved, "accounts": len(sim.model.posted),
               "created": sim.created, "lost": sim.lost, "resolved": dict(sim.resolved), "violation": None}
    print(f"{sim.ops_done} ops in {elapsed:.1f} s: {summary['ops_per_s']} ops/s "
          f"({sim.model.served} paid requests served, {sim.model.moved} sat moved, {len(sim.model.posted)} accounts)")
    print(f"ops by kind: {summary['ops_by_kind']}")
    print(f"faults injected by kind: {faults}")
    print(f"HTTP statuses: {summary['statuses']}; checkpoints {sim.checkpoints}, reconciles {sim.reconciles}")
    print(f"ambiguous outcomes resolved by transfer id: {dict(sorted(sim.resolved.items()))}; "
          f"captures refunded by the paywall: {sim.refunds}")
    if sim.run_outcomes:
        print(f"QA runs: {dict(sorted(sim.run_outcomes.items()))}")
    if violation is None:
        print(f"books: {sim.created} sat created, {sim.lost} sat lost" if sim.created or sim.lost
              else "books: 0 sat created or lost")
        if args.json:
            print(json.dumps(summary))
        shutil.rmtree(sim.tmp, ignore_errors=True)
        return 0 if not (sim.created or sim.lost) else 1
    summary["violation"] = {"invariant": violation.invariant, "op": violation.op, "detail": violation.detail}
    print(f"FAILED: invariant {violation.invariant} at op {violation.op} (seed {seed}): {violation.detail}")
    print(f"logs of the failing run: {sim.tmp}")
    source = OpSource(seed, kinds, cfg.modifiers, cfg.weights)
    ran = list(indices)
    failing = ran[:ran.index(violation.op) + 1] if violation.op in ran else ran
    if args.shrink_seconds > 0 and len(failing) > 1:
        print(f"shrinking {len(failing)} ops (budget {args.shrink_seconds:.0f} s)...", flush=True)
        failing = asyncio.run(shrink(cfg, failing, violation.invariant, args.shrink_seconds))
    off = sorted((set(OPS) | set(FAULTS) | set(MODIFIERS)) - kinds - cfg.modifiers)
    print(f"shortest op log found ({len(failing)} ops) for invariant {violation.invariant}:")
    shown = failing if len(failing) <= 60 else failing[-60:]
    if len(shown) < len(failing):
        print(f"  ... {len(failing) - len(shown)} earlier ops (see the replay line)")
    for i in shown:
        print("  " + json.dumps(source.op(i).to_json()))
    print("replay: python -m sim --seed {} --replay {}{}{}{}".format(
        seed, ranges(failing), f" --off {','.join(off)}" if off else "",
        f" --skip {','.join(sorted(cfg.skip))}" if cfg.skip else "",
        f" --weights {args.weights}" if args.weights else ""))
    if args.json:
        print(json.dumps({**summary, "shrunk": failing}))
    return 1


if __name__ == "__main__":
    sys.exit(main())
