"""What the engine keeps per request and per step: the request record, the events sent back, the
batches of running rows and the per-step record.

Why: the scheduler (`scheduler.py`), the stepper (`stepper.py`) and the loop (`engine.py`) all read and
write these; one module owns them so none of the three imports another for a type.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from ..cache.requests import ParkedSequence
from ..settings.config import DBTrimKVConfig
from ..errors import DBTrimKVError
from ..runner.decode import DecodeRow
from ..runner.prefill import PromptBatch
from ..runner.sampling import SamplingParams
from .admission import Reservation
from .api_errors import APIError, BadRequest, InternalError
from ..runner.text import TextTracker
from .sessions import Session


@dataclass
class Event:
    kind: str  # "token" (text piece), "done" (finish_reason, usage) or "error" (APIError)
    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    error: APIError | None = None


def config_key(config: DBTrimKVConfig) -> tuple:
    return tuple(sorted((k, tuple(sorted(v.items())) if isinstance(v, dict) else v)  # policy_options is a dict
                        for k, v in config.to_dict().items()))


@dataclass
class EngineRequest:
    """One chat completion: its new tokens (processor outputs, batch 1) and how to answer."""

    id: str
    inputs: dict
    config: DBTrimKVConfig
    sampling: SamplingParams
    sink: Callable[[Event], None]
    session_id: str | None = None
    session: Session | None = None  # a reserved session: continued, or replaced when `continues` is False
    continues: bool = False
    history: list[tuple] = field(default_factory=list)  # the request's messages, canonical (for its session)
    arrival: float = field(default_factory=time.monotonic)
    # text goes to `sink` every `send_every` generated tokens (the first token's at once); None: the whole
    # answer at the end (a request that is not streamed); see Stepper._accept
    send_every: int | None = 1
    # set by the engine
    prompt_len: int = 0
    budget: int | None = None  # entries it keeps: resolved once, by Scheduler.submit
    bound: int = 0
    reservation: Reservation | None = None
    cached_tokens: int = 0
    prefilled: int = 0
    prompt: PromptBatch | None = None  # its new tokens' positions and vision stream (the model runner's)
    row: DecodeRow | None = None  # its sampler, stop rule and generated ids (the model runner's decode row)
    tracker: TextTracker | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    solo: bool = False  # runs in a batch of its own (restarted after its batch's forward failed)
    seed: int | None = None  # the seed its sampler drew (kept by a restart)
    emitted: int = 0  # characters of its answer already sent (by a run before a restart)
    unsent: str = ""  # text the tracker gave that is not sent yet (send_every)
    unsent_tokens: int = 0  # tokens generated since text was last sent

    def __post_init__(self):
        self.prompt_len = int(self.inputs["input_ids"].shape[1])

    @property
    def generated(self) -> list[int]:
        """The ids it generated so far (its decode row's)."""
        return self.row.generated if self.row is not None else []

    def next_chunk(self) -> tuple[int, int]:
        """Prompt columns [start, end) the request feeds next: a chunk of all but the last prompt token,
        then the last one alone (its logits give the first generated token)."""
        total, start = self.prompt_len, self.prefilled
        return start, total if start == total - 1 else min(total - 1, start + self.config.prefill_chunk)

    def restart(self) -> None:
        """Start again from the first prompt token, alone, with the same seed; what was sent is not sent again."""
        self.seed = self.row.sampler.seed if self.row is not None else self.seed
        self.emitted = self.tracker.emitted - len(self.unsent) if self.tracker is not None else self.emitted
        self.unsent, self.unsent_tokens = "", 0
        self.prefilled, self.row, self.prompt = 0, None, None
        self.solo = True


@dataclass
class StepRecord:
    """One engine step: requests admitted, prompt tokens and decode tokens fed, and the most KV bytes
    held during it."""

    running: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    pool_bytes: int = 0
    views_bytes: int = 0


class Batch:
    """Running requests with one eviction setting: the rows of one serving cache, in row order, and
    the prefilling requests sitting out this step (`paused`, parked out of the cache)."""

    def __init__(self, key: tuple, cache, solo: bool = False):
        self.key, self.cache, self.requests, self.solo = key, cache, [], solo
        self.paused: dict[str, tuple[EngineRequest, ParkedSequence]] = {}

    def admitted(self) -> list[EngineRequest]:
        """Its rows and the requests sitting out this step."""
        return list(self.requests) + [p[0] for p in list(self.paused.values())]


def as_api_error(exc: Exception) -> APIError:
    """The client's error for a failure while serving one request: bad input is a 400, anything else a 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, DBTrimKVError):
        return BadRequest(str(exc))
    return InternalError(f"the engine failed on this request: {type(exc).__name__}: {exc}")
