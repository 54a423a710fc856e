"""`dbtrimkv watch SOURCE`: watch a live video in bounded KV memory and answer questions from stdin.

Frames stream into a `LiveSession` on a background thread while questions are read from stdin,
one per line; each answer is printed with the stream time it refers to (the last frame in the
cache it came from). A line `@SECONDS question` waits until the stream has reached SECONDS (or
ended) before asking, so a script can ask about a file played faster than real time. After the
source ends, questions are answered from the final cache; end of input stops the session. The
source is opened (and its first frame read) before the model loads, so a bad source fails at once.
"""

from __future__ import annotations

import argparse
import math
import sys
import threading

from ..errors import ConfigError
from .common import TINY_NOTICE, add_eviction_args, add_model_args, add_progress_arg, eviction_config, show_progress
from .lazy import lazy
from .video_qa import add_answer_length_arg, add_window_args

checkpoints = lazy("dbtrimkv.loading.checkpoints")
live = lazy("dbtrimkv.video_qa.live")
sources = lazy("dbtrimkv.video_qa.sources")
streaming = lazy("dbtrimkv.video_qa.streaming")
stats_text = lazy("dbtrimkv.reporting.stats_text")

DESCRIPTION = """\
Watch a video source (a file, a camera device such as /dev/video0, or a network stream PyAV can open:
rtsp://, http://, udp://, ...) and answer questions typed on stdin at any moment, from the compressed
cache of what has been seen so far (the video is never re-encoded; KV memory stays flat however long
the source runs). Each answer line starts with the stream time it refers to: [t=12.0s].
A line "@SECONDS question" waits for the stream to reach SECONDS first; a question asked before the
first frames are in waits for them. The source is opened before anything else: a missing file, a
directory, an absent camera or an unreachable stream is an error at once. A malformed line
(a bad time, an empty question) is reported on stderr and the session goes on; a time beyond the
end of a file is answered from all of it, with a note saying so.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("watch", help="answer questions about a live video (file, camera, stream) in bounded memory",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="video file, camera device or stream URL")
    p.add_argument("--fps", type=float, default=1.0, metavar="F", help="frames sampled per second (default: 1)")
    p.add_argument("--realtime", action="store_true",
                   help="play a file at its real speed, as a camera delivers frames (default: as fast as it decodes)")
    p.add_argument("--format", default=None, metavar="NAME",
                   help="PyAV/FFmpeg input format of SOURCE (e.g. v4l2, avfoundation, dshow; default: guessed)")
    add_window_args(p, window_frames=2, what="frames prefilled together; questions see the frames of complete windows")
    add_model_args(p)
    add_eviction_args(p)
    add_answer_length_arg(p, 32)
    add_progress_arg(p)
    p.set_defaults(func=run)


def parse_line(line: str) -> tuple[float | None, str]:
    """(`SECONDS` of an `@SECONDS question` line or None, the question); ConfigError for a line that
    is not a question: a bad or non-finite time, or nothing to ask."""
    seconds, question = None, line.strip()
    if question.startswith("@"):
        head, _, question = question[1:].partition(" ")
        try:
            seconds = float(head)
        except ValueError:
            raise ConfigError(f"a line starting with @ needs a time in seconds first (@12.5 question), "
                              f"got {line.strip()!r}") from None
        if not math.isfinite(seconds) or seconds < 0:
            raise ConfigError(f"the time of an @ line must be a finite number of seconds >= 0, got {head!r}")
        question = question.strip()
    if not question:
        raise ConfigError(f"empty question in {line.strip()!r}: nothing to ask")
    return seconds, question


def run(args) -> int:
    if args.fps <= 0 or not math.isfinite(args.fps):
        raise ConfigError(f"--fps must be > 0 for a live source, got {args.fps}")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    options = streaming.StreamOptions(fps=args.fps, window_frames=args.window_frames, frame_tokens=args.frame_tokens)
    frames = sources.open_source(args.source, fps=args.fps, realtime=args.realtime, format=args.format)
    show_progress(args)  # the model download's bars
    if args.model is None:
        print(TINY_NOTICE, file=sys.stderr)
    model, processor = checkpoints.load_model(args.model, device=args.device, dtype=args.dtype)
    session = live.LiveSession(model, processor, eviction_config(args, model), options, args.max_new_tokens)
    watcher = _Watcher(session, frames)
    watcher.start()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            at, question = parse_line(line)
        except ConfigError as exc:  # one mistyped line must not end a live session
            print(f"dbtrimkv: error: {exc}; the session goes on", file=sys.stderr)
            continue
        _answer(watcher, session, at, question)
    watcher.stop()
    if watcher.error is not None:
        raise watcher.error
    memory = session.memory()
    print(f"watched {session.frames} frames ({session.stream_seconds:.1f} s) | KV: "
          f"{stats_text.entries(memory['entries'])} now, peak {memory['peak_entries']}, storage "
          f"{stats_text.format_bytes(memory['kv_bytes'])} allocated", file=sys.stderr)
    return 0


def _answer(watcher: "_Watcher", session, at: float | None, question: str) -> None:
    """Wait for the time asked (or the first frames), say when the stream cannot give it, answer."""
    if session.frames == 0 and not watcher.done.is_set():
        print(f"note: no frame is in the cache yet (frames are added {session.window} at a time): waiting for the "
              "first ones", file=sys.stderr)
    watcher.wait_until(at)
    if watcher.error is not None:
        raise watcher.error
    if at is not None and session.stream_seconds < at:  # wait_until returned: the stream ended first
        print(f"note: the stream ended at t={session.stream_seconds:.1f}s, before t={at:g}s: answering from "
              "everything it showed", file=sys.stderr)
    answer = session.ask(question)
    print(f"[t={answer.stream_seconds:.1f}s] {answer.text}", flush=True)


class _Watcher:
    """Feeds the session from the source on a daemon thread; remembers the first error."""

    def __init__(self, session, frames):
        self.session, self.frames = session, frames
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="dbtrimkv-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            for index, frame, fps in self.frames:
                if self._stop.is_set():
                    break
                self.session.push(index, frame, fps)
                with self._progress:
                    self._progress.notify_all()
            else:
                self.session.flush()  # the source ended: its last frames count too
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc
        finally:
            self.done.set()
            with self._progress:
                self._progress.notify_all()

    def wait_until(self, seconds: float | None) -> None:
        """Block until the cache holds a frame and the stream reached `seconds` (None: any time), or it ended."""
        def reached() -> bool:
            return self.session.frames > 0 and (seconds is None or self.session.stream_seconds >= seconds)

        with self._progress:
            self._progress.wait_for(lambda: self.done.is_set() or reached())

    def stop(self) -> None:
        self._stop.set()
