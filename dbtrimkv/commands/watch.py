"""`dbtrimkv watch SOURCE`: watch a live video in bounded KV memory and answer questions from stdin.

Frames stream into a `LiveSession` on a background thread while questions are read from stdin,
one per line; each answer is printed with the stream time it refers to (the last frame in the
cache it came from). A line `@SECONDS question` waits until the stream has reached SECONDS (or
ended) before asking, so a script can ask about a file played faster than real time. After the
source ends, questions are answered from the final cache; end of input stops the session.
"""

from __future__ import annotations

import argparse
import sys
import threading

from .. import checkpoints
from ..errors import ConfigError
from ..pipeline import format_bytes
from ..video_qa.live import LiveSession
from ..video_qa.sources import stream_frames
from ..video_qa.streaming import StreamOptions
from .common import TINY_NOTICE, add_eviction_args, add_model_args, eviction_config
from .video_qa import add_answer_length_arg, add_window_args

DESCRIPTION = """\
Watch a video source (a file, a camera device such as /dev/video0, or a network stream PyAV can open:
rtsp://, http://, udp://, ...) and answer questions typed on stdin at any moment, from the compressed
cache of what has been seen so far (the video is never re-encoded; KV memory stays flat however long
the source runs). Each answer line starts with the stream time it refers to: [t=12.0s].
A line "@SECONDS question" waits for the stream to reach SECONDS first.
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
    p.set_defaults(func=run)


def parse_line(line: str) -> tuple[float | None, str]:
    """(`SECONDS` of an `@SECONDS question` line or None, the question)."""
    if not line.startswith("@"):
        return None, line
    head, _, question = line[1:].partition(" ")
    try:
        seconds = float(head)
    except ValueError:
        raise ConfigError(f"a line starting with @ needs a time in seconds first, got {line!r}") from None
    return seconds, question.strip()


def run(args) -> int:
    if args.fps <= 0:
        raise ConfigError(f"--fps must be > 0 for a live source, got {args.fps}")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    options = StreamOptions(fps=args.fps, window_frames=args.window_frames, frame_tokens=args.frame_tokens)
    frames = stream_frames(args.source, fps=args.fps, realtime=args.realtime, format=args.format)
    if args.model is None:
        print(TINY_NOTICE, file=sys.stderr)
    model, processor = checkpoints.load_model(args.model, device=args.device, dtype=args.dtype)
    session = LiveSession(model, processor, eviction_config(args, model), options, args.max_new_tokens)
    watcher = _Watcher(session, frames)
    watcher.start()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        at, question = parse_line(line)
        watcher.wait_until(at)
        if watcher.error is not None:
            raise watcher.error
        answer = session.ask(question)
        print(f"[t={answer.stream_seconds:.1f}s] {answer.text}", flush=True)
    watcher.stop()
    if watcher.error is not None:
        raise watcher.error
    memory = session.memory()
    print(f"watched {session.frames} frames ({session.stream_seconds:.1f} s) | KV: {memory['entries']} entries, "
          f"peak {memory['peak_entries']}, storage {format_bytes(memory['kv_bytes'])}", file=sys.stderr)
    return 0


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
        """Block until the stream reached `seconds` (None: return at once) or ended."""
        if seconds is None:
            return
        with self._progress:
            self._progress.wait_for(lambda: self.done.is_set() or self.session.stream_seconds >= seconds)

    def stop(self) -> None:
        self._stop.set()
