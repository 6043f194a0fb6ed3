"""The command line: `python -m bench.badinput [--messages N] [--examples M] [--seed S] ...`."""

from __future__ import annotations

import argparse
import json
import random
import sys

import bench.badinput
from bench.badinput import ALL_KINDS, run, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.badinput",
                                     description=bench.badinput.__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=10_000, help="raw messages (default 10000)")
    parser.add_argument("--examples", type=int, default=300,
                        help="Hypothesis examples (default 300)")
    parser.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    parser.add_argument("--skip", action="append", default=[], choices=sorted(ALL_KINDS),
                        metavar="KIND",
                        help=f"leave a message kind out: {', '.join(sorted(ALL_KINDS))}")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2 ** 32)
    figures = run(args.messages, args.examples, seed, ALL_KINDS - set(args.skip))
    print(summary(figures))
    if args.json:
        print(json.dumps(figures, indent=2, default=str))
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
