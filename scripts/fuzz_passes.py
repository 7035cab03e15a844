#!/usr/bin/env python3
"""Long differential fuzzing campaigns over every registered pass and the default recipe.

Seeds ``S .. S+N-1`` each give one random valid graph (``graph_passes.testing.fuzzing``, the same
generator the tests drive with hypothesis). Every pass alone and the default recipe run on
it; a crash, a checker or ONNX Runtime error, or outputs off by more than rtol=1e-4 /
atol=1e-5 is a failure, and the graph is saved as ``tests/fuzz_regressions/<pass>-<hash>.onnx``
where ``tests/test_fuzz_passes.py`` replays it from then on.

    python scripts/fuzz_passes.py --examples 10000 [--seed 0] [--jobs 2]

Ends with the line ``N graphs, F failures``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

from graph_passes.testing import fuzzing
from pipeline.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
REGRESSIONS = ROOT / "tests" / "fuzz_regressions"
DEFAULT_PASSES = load_recipe("default").passes


def _one(seed: int) -> tuple[int, bool, list[fuzzing.Failure], bytes]:
    proto = fuzzing.random_model(seed)
    if not fuzzing.is_valid(proto):
        return seed, False, [], b""
    try:
        failures = fuzzing.check_model(proto, DEFAULT_PASSES)
    except Exception as exc:  # the harness itself must not stop a campaign
        failures = [fuzzing.Failure("harness", "raised", repr(exc))]
    data = proto.SerializeToString() if failures else b""
    return seed, True, failures, data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, required=True, help="graphs to generate")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--out", type=Path, default=REGRESSIONS, help="where failures go")
    parser.add_argument(
        "--time-limit", type=float, default=None, help="stop cleanly after this many seconds"
    )
    args = parser.parse_args()
    seeds = range(args.seed, args.seed + args.examples)
    start = time.perf_counter()
    checked = skipped = failures = 0
    with multiprocessing.Pool(args.jobs) as pool:
        for done, (seed, valid, found, data) in enumerate(pool.imap(_one, seeds, 8), 1):
            checked += valid
            skipped += not valid
            for failure in found:
                failures += 1
                path = fuzzing.save_failure(failure, data, args.out)
                reason = " ".join(failure.reason.split())[-300:]
                print(f"FAIL seed={seed} {failure.pass_name} {failure.stage}: {reason}")
                print(f"  saved {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
            elapsed = time.perf_counter() - start
            if done % 100 == 0:
                print(
                    f"{done}/{args.examples} seeds, {failures} failures, {elapsed:.0f} s",
                    flush=True,
                )
            if args.time_limit is not None and elapsed > args.time_limit:
                print(f"time limit reached after {done} seeds")
                pool.terminate()
                break
    elapsed = time.perf_counter() - start
    last = args.seed + checked + skipped - 1
    print(f"seeds {args.seed}..{last}, {skipped} invalid skipped, {elapsed:.0f} s")
    print(f"{checked} graphs, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
