"""Next-token choice per row: greedy at temperature 0, else temperature + top-k + top-p with its own seed.

Why: requests in one batch have their own sampling settings; each keeps a private generator so a
seeded request samples the same tokens whatever else runs beside it (and a request the engine has
to run again after a failed batch samples the same tokens the second time: an unseeded request
keeps the seed it drew). `SamplingParams` is the one owner of what a valid setting is: it refuses
a non-finite or out-of-range value with `InvalidSampling` naming the field (the HTTP layer turns it
into a 400 with that `param`), so a NaN temperature can never reach `torch.multinomial`. The model
runner (`runner.decode`) samples every path's tokens through `Sampler`: the pipeline's, the video and
evaluation paths' and the server's.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError

SEED_RANGE = (-(2**63), 2**63 - 1)


class InvalidSampling(ConfigError):
    """A sampling setting out of range; `field` names it as the client spelled it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    """A request's settings, in OpenAI's ranges (temperature at most 2)."""

    MAX_TEMPERATURE: ClassVar[float] = 2.0
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        # a numpy / torch scalar is taken as the plain number it holds (frozen: set through object)
        object.__setattr__(self, "max_tokens", _integer("max_tokens", self.max_tokens, 1, None))
        object.__setattr__(self, "temperature", _real("temperature", self.temperature, 0.0, self.MAX_TEMPERATURE,
                                                      f"[0, {self.MAX_TEMPERATURE:g}]"))
        object.__setattr__(self, "top_p", _real("top_p", self.top_p, 0.0, 1.0, "(0, 1]", open_low=True))
        object.__setattr__(self, "top_k", _integer("top_k", self.top_k, 0, None))
        if self.seed is not None:
            object.__setattr__(self, "seed", _integer("seed", self.seed, *SEED_RANGE))
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidSampling("stop", "'stop' strings must be non-empty")


@dataclass(frozen=True)
class LocalSampling(SamplingParams):
    """`dbtrimkv.generate`'s settings: a temperature up to 100, as the command line takes."""

    MAX_TEMPERATURE: ClassVar[float] = 100.0


def integer_value(value) -> int | None:
    """`value` as a plain int if it is an integer: a Python, numpy or 0-d torch integer (never a bool); else None."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex:
            return None
        return int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # (numpy's bool is not Integral)
        return None
    return int(value)


def real_value(value) -> float | int | None:
    """`value` as a plain int or float if it is a real number (Python, numpy or 0-d torch; never a bool); else None."""
    whole = integer_value(value)
    if whole is not None:
        return whole
    if isinstance(value, torch.Tensor):
        return float(value.item()) if value.dim() == 0 and value.dtype.is_floating_point else None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _integer(name: str, value, low: int, high: int | None) -> int:
    whole = integer_value(value)
    if whole is None:
        raise InvalidSampling(name, f"'{name}' must be an integer, got {value!r}")
    if whole < low or (high is not None and whole > high):
        raise InvalidSampling(name, f"'{name}' must be in [{low}, {'inf' if high is None else high}], got {value!r}")
    return whole


def _real(name: str, value, low: float, high: float, shown: str, open_low: bool = False) -> float | int:
    number = real_value(value)
    if number is None:
        raise InvalidSampling(name, f"'{name}' must be a number, got {value!r}")
    if not math.isfinite(number):
        raise InvalidSampling(name, f"'{name}' must be a finite number, got {value!r}")
    if number < low or number > high or (open_low and number == low):
        raise InvalidSampling(name, f"'{name}' must be in {shown}, got {value!r}")
    return number


class Sampler:
    """Draws one row's tokens with its settings and a private generator."""

    def __init__(self, params: SamplingParams, seed: int | None = None):
        """`seed` overrides `params.seed` (the engine passes the seed an earlier run of the request drew)."""
        self.params = params
        self.generator = torch.Generator()
        seed = params.seed if seed is None else seed
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        self.seed = self.generator.initial_seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """Token id from one row of logits `[V]`."""
        p = self.params
        logits = logits.float().cpu()
        if p.temperature == 0:
            return int(torch.argmax(logits))
        if 0 < p.top_k < logits.numel():
            logits = logits.masked_fill(logits < torch.topk(logits, p.top_k).values[-1], float("-inf"))
        probs = torch.softmax(logits / p.temperature, -1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            outside = torch.cumsum(sorted_probs, -1) - sorted_probs >= p.top_p  # keep the smallest nucleus
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))
