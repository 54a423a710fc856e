"""The `dbtrimkv` command line.

Why: the first thing a user runs is `dbtrimkv chat --image cat.png "what is this?"`. Each
subcommand lives in `dbtrimkv/commands/<name>.py` with an `add_parser(subparsers)` function; this
module only assembles them and turns a `DBTrimKVError` (bad image, unknown model, budget too
small, ...) into one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import DBTrimKVError

COMMANDS = ("chat", "eval", "demo", "train", "video-qa")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dbtrimkv", description="Qwen3-VL inside a fixed KV-cache budget.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"dbtrimkv.commands.{name.replace('-', '_')}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DBTrimKVError as exc:
        print(f"dbtrimkv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
