"""`make bench` / `python -m bench [--quick] [--only pipeline,http,media,webhook]`: every benchmark in turn.

Each benchmark starts its own servers and processes, prints a table with ratios against
a baseline measured in the same run, and writes var/bench/<name>.json. Options after the
ones below are passed to each benchmark (e.g. `--rounds 3`); run one alone for its own
options: `python -m bench.pipeline --help`, `python -m bench.http --help`.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
import traceback

BENCHMARKS = ("pipeline", "http", "media", "webhook", "reset", "live")


def _entry_point(module):
    for name in ("main", "run"):
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    return None


def _call(fn, argv: list[str]):
    """Pass the forwarded options to an entry point that takes them; call others bare."""
    try:
        takes_args = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
                         for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        takes_args = True
    return fn(argv) if takes_args else fn()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller N and shorter measurements")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    args, rest = p.parse_known_args(argv)
    chosen = [b.strip() for b in args.only.split(",")] if args.only else list(BENCHMARKS)
    unknown = [b for b in chosen if b not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(unknown)}")
    forwarded = (["--quick"] if args.quick else []) + rest

    failed = []
    for name in chosen:
        began = time.monotonic()
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"bench.{name}":
                raise
            print(f"\n== {name} ==\nskipped: bench/{name}.py does not exist yet", flush=True)
            continue
        entry = _entry_point(module)
        if entry is None:
            print(f"\n== {name} ==\nskipped: bench/{name}.py has no main() or run()", flush=True)
            continue
        try:
            _call(entry, forwarded)
        except SystemExit as exc:  # an argparse error or a benchmark's own exit
            if exc.code not in (0, None):
                failed.append(name)
                print(f"{name}: exited with {exc.code}", file=sys.stderr)
        except KeyboardInterrupt:
            raise
        except Exception:
            failed.append(name)
            traceback.print_exc()
        print(f"({name}: {time.monotonic() - began:.0f} s)", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; everything the benchmarks started was stopped", file=sys.stderr)
        sys.exit(130)
