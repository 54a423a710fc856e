"""The `dbtrimkv` command line.

Why: the first thing a user runs is `dbtrimkv chat --image cat.png "what is this?"`. Each
subcommand lives in `dbtrimkv/commands/<name>.py` with an `add_parser(subparsers)` function; this
module only assembles them and turns a `DBTrimKVError` (bad image, unknown model, budget too
small, ...) into one line on stderr and exit status 2, never a traceback. Building the parser imports
neither torch nor transformers (the commands import the engine lazily, `commands/lazy.py`), so
`--help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .commands.arguments import OneLineParser
from .commands.common import check_before_load
from .commands.lazy import lazy
from .errors import DBTrimKVError

environment = lazy("dbtrimkv.environment")

COMMANDS = ("chat", "eval", "demo", "serve", "train", "video-qa", "watch")


class VersionReport(argparse.Action):
    """`--version`: the versions and capabilities a bug report needs, then exit."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(environment.version_report())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dbtrimkv", description="Qwen3-VL inside a fixed KV-cache budget.")
    parser.add_argument("--version", action=VersionReport,
                        help="print dbtrimkv's version, the versions of the libraries it hooks, and whether "
                             "CUDA and the Triton kernels are usable, then exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"dbtrimkv.commands.{name.replace('-', '_')}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_before_load(args)
        return args.func(args)
    except DBTrimKVError as exc:
        print(f"dbtrimkv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `dbtrimkv ... | head`: the reader left; stop quietly
        _silence_stdout()
        return 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
