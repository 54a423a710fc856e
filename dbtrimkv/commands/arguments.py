"""Argument types and checks every subcommand uses, so bad flags fail before any model loads.

Why: a flag checked only where it is used fails after the model has loaded (seconds for the toy
model, minutes for a real one) and often as a traceback from deep inside torch. Each numeric flag
gets an argparse `type=` from here (a bound and a message naming the flag); `common.check_before_load`
runs the checks that need several flags at once (eviction settings, device, port) before loading.
Parse errors print one `dbtrimkv: error: ...` line and exit with status 2 (`OneLineParser`).
"""

from __future__ import annotations

import argparse
import math
import re
import socket

from ..errors import ConfigError
from ..inputs.text_files import check_unicode

MAX_NEW_TOKENS = 1_000_000
MAX_FRAMES = 100_000
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")

# The registered policies and their options' defaults, as the parser states them without importing the
# policies (they import torch). `tests/cli/test_lazy_cli.py` checks both against `dbtrimkv.policies`.
POLICY_NAMES = ("global", "h2o", "head", "knorm", "layer", "random", "snapkv", "streaming", "threshold")
POLICY_OPTION_DEFAULTS = {"h2o": {"recent_fraction": 0.5}, "random": {"seed": 0},
                          "snapkv": {"window": 16, "kernel": 5}, "streaming": {"sinks": 4}}


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one `dbtrimkv: error: ...` line (and exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"dbtrimkv: error: {message} (see {self.prog} --help)\n")


def _number(text: str, kind):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _number_in(kind, name: str, low, high, low_open: bool = False):
    """An argparse type: a `kind` number (int, or finite float) in [low, high] (or (low, high] with `low_open`)."""
    show = str if kind is int else "{:g}".format

    def parse(text: str):
        value = _number(text, kind)
        got = value if kind is int else text
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(
                f"must be {'greater than' if low_open else 'at least'} {show(low)}, got {got}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {show(high)}, got {got}")
        return value

    parse.__name__ = name
    return parse


def int_in(low: int | None = None, high: int | None = None):
    """An argparse type: a whole number in [low, high]."""
    return _number_in(int, "integer", low, high)


def float_in(low: float | None = None, high: float | None = None, low_open: bool = False):
    """An argparse type: a finite number in [low, high] (or (low, high] with `low_open`)."""
    return _number_in(float, "number", low, high, low_open)


positive_int = int_in(1)
non_negative_int = int_in(0)
positive_float = float_in(0.0, low_open=True)
new_tokens = int_in(1, MAX_NEW_TOKENS)
temperature = float_in(0.0, 100.0, low_open=True)
top_p = float_in(0.0, 1.0, low_open=True)
fraction = float_in(0.0, 1.0, low_open=True)
unit_interval = float_in(0.0, 1.0)
frames = int_in(1, MAX_FRAMES)
port = int_in(1, 65535)


def text(value: str) -> str:
    """A prompt or question: refused when it is not valid Unicode (command-line bytes that are not UTF-8)."""
    try:
        return check_unicode(value, "the value", ConfigError)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def video_fps(text: str) -> float:
    """Frames per second: a finite number > 0 (0 = every frame)."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (every frame) or a positive number, got {text}")
    return value


def device(text: str) -> str:
    if not DEVICE_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N, mps or auto, got {text!r}")
    return text


def check_port_free(host: str, number: int) -> None:
    """ConfigError naming --port when nothing can listen on host:number."""
    try:
        infos = socket.getaddrinfo(host, number, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"--host {host!r} is not an address this machine can listen on ({exc})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{number} ({exc.strerror or exc}); the port is in use "
                              f"or not allowed: choose another with --port") from None
