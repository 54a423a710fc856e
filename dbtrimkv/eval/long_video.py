"""Long-video recall: a digit held for 3 frames somewhere in minutes to an hour of distractor frames.

Why: a fixed KV budget matters most for long videos, where a full cache grows with every frame.
This benchmark streams synthetic videos of growing length through `video-qa`'s windowed path
(`video_qa.streaming`: windows of frames prefilled with eviction, then the question from a fork
of the compressed cache) at one fixed memory size, and records per length and policy the
accuracy, the KV memory, the process's resident memory and the time per minute of video. The
full cache runs until its KV storage passes a cap (a stand-in for accelerator memory); beyond
that it is recorded as out of memory.

A video is a pure function of its seed and length: frame `i` is drawn from its own
`random.Random`, so frames are generated one window at a time and never held all at once (an
hour at 2 fps is 7,200 frames). The digit is on screen for `DIGIT_HOLD` (3) consecutive frames
starting at a uniformly random time, as in the recall task's clips (`dbtrimkv.recall.tasks`: three
frames always contain one whole 2-frame group of Qwen3-VL's video patching, so the digit gets a
vision token of its own); the question (`which digit is in the video?`) comes after the last frame.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from ..loading import checkpoints
from ..loading.checkpoints import gates_are_trained
from ..settings.config import DBTrimKVConfig
from ..loading.models import DEFAULT_MODEL
from ..modeling.transformers_compat import installed_version
from ..recall.tasks import DIGIT_HOLD, DIGITS, VIDEO_QUESTION, draw_digit, draw_shape
from ..reporting.retention_timeline import fork_tokens, save
from ..video_qa.streaming import StreamOptions, ask, encode_windows, frame_windows

logger = logging.getLogger(__name__)

FULL = "full"
OOM = "out of memory"


@dataclass(frozen=True)
class LongVideo:
    """A synthetic video: `minutes` at `fps` frames per second of `image_size`-pixel frames, of which
    `hold` consecutive ones from frame `needle` (a random time) show `digit`, one still image; all
    others show distractor shapes."""

    seed: int
    minutes: float
    fps: float = 1.0
    image_size: int = 32
    hold: int = DIGIT_HOLD

    @property
    def num_frames(self) -> int:
        return max(self.hold, 2, round(self.minutes * 60 * self.fps))

    @property
    def needle(self) -> int:
        """The first digit frame."""
        return random.Random(f"needle:{self.seed}:{self.num_frames}").randrange(self.num_frames - self.hold + 1)

    @property
    def digit(self) -> str:
        return random.Random(f"digit:{self.seed}").choice(DIGITS)

    def frame(self, index: int) -> np.ndarray:
        if self.needle <= index < self.needle + self.hold:  # the digit's still image, drawn from the first's rng
            return np.asarray(draw_digit(self.digit, self.image_size, random.Random(f"frame:{self.seed}:{self.needle}"))[0])
        rng = random.Random(f"frame:{self.seed}:{index}")
        return np.asarray(draw_shape(self.image_size, rng))

    def frames(self) -> Iterator[tuple[int, np.ndarray, float]]:
        """`(index, RGB frame, fps)` one at a time, as `media.iter_video_frames` yields a file's."""
        for index in range(self.num_frames):
            yield index, self.frame(index), self.fps


@dataclass
class LongVideoSpec:
    """What to run: video lengths (minutes), examples per length (seeds `first_seed` onwards: the
    benchmark's are 0..N-1, others give held-out videos for tuning), policies at `memory_size` M per
    (layer, KV head), and the full cache up to `full_cache_cap_mb` of KV storage."""

    minutes: list[float] = field(default_factory=lambda: [1, 2, 5, 10, 30, 60])
    fps: float = 1.0
    examples: int = 4
    policies: list[str] = field(default_factory=lambda: ["global", "head", "streaming", "snapkv", "h2o"])
    memory_size: int = 32
    full_cache_cap_mb: float = 16.0
    window_frames: int = 16
    image_size: int = 32
    timeline_minutes: float | None = None  # draw the retention timeline of `global` on the first video of this length
    max_new_tokens: int = 8  # `video:` and the digit (the tiny tokenizer spells words by character)
    first_seed: int = 0
    calibration: dict = field(default_factory=dict)  # DBTrimKVConfig video_decay_scale / decay_floor of the bounded policies


class _OverCap(Exception):
    """The full cache's KV storage passed the cap."""


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


_ANSWER = re.compile(r"(\d)")


def parse_digit(text: str) -> str | None:
    """The first digit of an answer (`video:7` -> `7`)."""
    found = _ANSWER.search(text)
    return found.group(1) if found else None


def run_one(model, processor, video: LongVideo, policy: str, spec: LongVideoSpec, timeline=None) -> dict:
    """Stream `video` through a fresh cache of `policy` (or the full cache) and answer the question;
    `timeline`: a PNG path for the retention timeline of the cache that answered."""
    if policy == FULL:
        config, cap = DBTrimKVConfig(), spec.full_cache_cap_mb * 2**20
    else:
        config, cap = DBTrimKVConfig(memory_size=spec.memory_size, policy=policy, **spec.calibration), None
    options = StreamOptions(fps=0, window_frames=spec.window_frames)
    peak = {"rss": rss_bytes(), "kv": 0}

    def measure(cache, window) -> None:
        peak["rss"] = max(peak["rss"], rss_bytes())
        peak["kv"] = max(peak["kv"], cache.storage_bytes())
        if cap is not None and cache.storage_bytes() > cap:
            raise _OverCap

    start, cpu = time.perf_counter(), time.process_time()
    windows = frame_windows(processor, video.frames(), options, total=video.num_frames)
    try:
        encoded = encode_windows(model, processor, windows, config, name=f"seed {video.seed}", on_window=measure)
    except _OverCap:
        return {"status": OOM, "kv_bytes": peak["kv"], "rss_bytes": peak["rss"]}
    answer = ask(model, processor, encoded, VIDEO_QUESTION, max_new_tokens=spec.max_new_tokens)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    peak["rss"] = max(peak["rss"], rss_bytes())
    if timeline is not None:
        save(answer.cache, fork_tokens(encoded.token_ids, answer.cache), processor.tokenizer, timeline,
             title=f"retention timeline: {video.minutes:g} min video at {video.fps:g} fps, digit frames at "
                   f"{video.needle / video.fps:.0f}-{(video.needle + video.hold - 1) / video.fps:.0f} s, "
                   f"answer {answer.text!r} ({policy}, M = {spec.memory_size})")
    return {"status": "ok", "answer": answer.text, "correct": parse_digit(answer.text) == video.digit,
            "kv_bytes": max(peak["kv"], encoded.cache.storage_bytes()), "peak_entries": encoded.cache.peak_entries[0],
            "prompt_tokens": sum(answer.stats.prompt_tokens.values()), "rss_bytes": peak["rss"], "seconds": seconds,
            "cpu_seconds": cpu_seconds}


def _cell(minutes: float, policy: str, runs: list[dict], spec: LongVideoSpec) -> dict:
    done = [r for r in runs if r["status"] == "ok"]
    cell = {"minutes": minutes, "policy": policy, "examples": len(runs), "status": "ok" if done else OOM,
            "kv_bytes": max(r["kv_bytes"] for r in runs), "rss_bytes": max(r["rss_bytes"] for r in runs)}
    if done:
        cell.update(accuracy=sum(r["correct"] for r in done) / len(runs),
                    peak_entries=max(r["peak_entries"] for r in done),
                    prompt_tokens=max(r["prompt_tokens"] for r in done),
                    seconds_per_minute=sum(r["seconds"] for r in done) / len(done) / minutes,
                    cpu_seconds_per_minute=sum(r["cpu_seconds"] for r in done) / len(done) / minutes,
                    answers=[r["answer"] for r in done])
    return cell


def run_long_video(spec: LongVideoSpec, model_name: str | None = None, device: str = "cpu",
                   dtype: str | None = None, timeline_path=None) -> dict:
    """Every (length, policy) on `spec.examples` videos. The bounded policies run first, over every
    length, and the full cache after them, so its allocations (the process keeps their high water)
    do not inflate the bounded policies' resident memory; it is not run past the length where it
    ran out of memory (a longer video only adds tokens). Returns the results dict, cells ordered
    by length, then policy. With `spec.timeline_minutes`, `global`'s retention timeline on the first seed
    at that length goes to `timeline_path`."""
    model_name = str(model_name or DEFAULT_MODEL)  # the shipped tiny-recall model
    model, processor = checkpoints.load_model(model_name, device=device, dtype=dtype)
    cells, full_oom_at = [], None
    for policy in [*spec.policies, FULL]:
        for minutes in spec.minutes:
            if policy == FULL and full_oom_at is not None:
                cells.append({"minutes": minutes, "policy": FULL, "examples": 0, "status": OOM,
                              "note": f"not run: out of memory at {full_oom_at:g} min already"})
                continue
            runs = []
            for seed in range(spec.first_seed, spec.first_seed + spec.examples):
                video = LongVideo(seed, minutes, spec.fps, spec.image_size)
                draw = policy == "global" and seed == spec.first_seed and minutes == spec.timeline_minutes
                runs.append(run_one(model, processor, video, policy, spec, timeline_path if draw else None))
                if runs[-1]["status"] == OOM:
                    break
            cells.append(_cell(minutes, policy, runs, spec))
            if cells[-1]["status"] == OOM:
                full_oom_at = minutes
            logger.info("%g min %s: %s", minutes, policy, {k: v for k, v in cells[-1].items() if k != "answers"})
    rank = {policy: i for i, policy in enumerate([*spec.policies, FULL])}
    cells.sort(key=lambda cell: (spec.minutes.index(cell["minutes"]), rank[cell["policy"]]))
    # the transformers release matters: 5.25's Qwen3-VL processor dropped the outer vision wrapper of a
    # video (2 tokens), which moves some policies' answers (README, long-video section)
    return {"benchmark": "long-video recall", "model": model_name, "gates_trained": gates_are_trained(model),
            "transformers": installed_version(), "spec": asdict(spec), "frames_per_minute": round(60 * spec.fps), "results": cells}
