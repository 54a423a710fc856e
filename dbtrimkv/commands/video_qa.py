"""`dbtrimkv video-qa`: answer questions about long videos, or run a video QA dataset, in bounded KV memory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError
from ..reporting.output_paths import check_writable_file
from . import arguments
from .common import TINY_NOTICE, add_eviction_args, add_model_args, add_progress_arg, eviction_config, show_progress
from .lazy import lazy

checkpoints = lazy("dbtrimkv.loading.checkpoints")
portable = lazy("dbtrimkv.cache.portable")
retention_timeline = lazy("dbtrimkv.reporting.retention_timeline")
video_qa = lazy("dbtrimkv.video_qa")
runner = lazy("dbtrimkv.video_qa.runner")
saved = lazy("dbtrimkv.video_qa.saved")
stats_text = lazy("dbtrimkv.reporting.stats_text")

DESCRIPTION = """\
Answer questions about a video of any length inside a fixed KV budget. The video is decoded with
PyAV at --fps and streamed window by window (--window-frames sampled frames at a time) through the
vision tower and the language model, evicting as it goes: KV memory and decoded frames stay bounded
however long the video is. Every frame is resized to one fixed size (at most --frame-tokens vision
tokens per frame group) so windows match whole-video processing. The compressed video cache is
encoded once and copied for each question. KV memory peaks at budget + layers x KV heads x
max(buffer size, prefill chunk) entries; for long videos try --config budget-long-video.

Single video:  dbtrimkv video-qa --video clip.mp4 "question 1" "question 2"
Encode once:   dbtrimkv video-qa --video clip.mp4 --save-cache clip.dbkv "question 1"
Ask later:     dbtrimkv video-qa --load-cache clip.dbkv "question 2"   (the video is not decoded again)
Dataset:       dbtrimkv video-qa --dataset FILE --format videomme|mlvu|jsonl --video-dir DIR --output preds.jsonl
"""

EPILOG = """\
dataset formats (JSON list, JSONL, or Parquet with pandas):
  videomme  Video-MME records: question_id, videoID (video file <video-dir>/<videoID>.mp4), question,
            options ["A. ...", ...], answer (a letter); accuracy also by duration / task_type
  mlvu      MLVU records: video, question, candidates (option texts), answer (the right candidate's
            text), question_type; videos in <video-dir>/<video> or <video-dir>/<annotation stem>/<video>
  jsonl     {"video": path, "question": ..., "answer": ...} per line; optional "id", "options"
The dataset run appends one JSON line per question to --output as it goes and skips ids already there,
so an interrupted run resumes where it stopped; accuracy goes to <output stem>.metrics.json and stdout.
Single-video answers go to stdout, KV statistics to stderr.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("video-qa", help="answer questions about long videos in bounded KV memory, or run a dataset",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("questions", nargs="*", type=arguments.text, metavar="QUESTION",
                   help="questions about --video (one or more)")
    src = p.add_argument_group("input (either --video with questions, or --dataset)")
    src.add_argument("--video", metavar="PATH", help="a video file to ask QUESTIONs about")
    src.add_argument("--save-cache", metavar="FILE", default=None,
                     help="with --video: also save the compressed video cache to FILE (safetensors + JSON metadata)")
    src.add_argument("--load-cache", metavar="FILE", default=None,
                     help="instead of --video: answer QUESTIONs from a cache saved with --save-cache, without decoding "
                          "the video again (its eviction settings are the saved ones; the model must be the same)")
    src.add_argument("--dataset", metavar="FILE", help="an annotation file (JSON, JSONL or Parquet)")
    src.add_argument("--format", choices=("videomme", "mlvu", "jsonl"), default=None,
                     help="annotation format of --dataset (required with it)")
    src.add_argument("--video-dir", metavar="DIR", default=None,
                     help="folder relative video paths resolve against (default: the annotation file's folder)")
    src.add_argument("--output", metavar="FILE", default=None,
                     help="predictions JSONL for --dataset (required with it; appended to, resumed from)")
    src.add_argument("--limit", type=arguments.positive_int, default=None, metavar="N", help="only the first N questions of --dataset")
    v = p.add_argument_group("video streaming")
    v.add_argument("--fps", type=arguments.video_fps, default=2.0, metavar="F",
                   help="frames sampled per second of video; 0 = every frame (default: 2)")
    v.add_argument("--max-frames", type=arguments.positive_int, default=None, metavar="N",
                   help="stop after this many sampled frames (default: no limit, the whole video streams through)")
    add_window_args(v, window_frames=32, what="sampled frames decoded, encoded and prefilled together")
    add_model_args(p)
    add_eviction_args(p)
    add_answer_length_arg(p, 64)
    add_progress_arg(p)
    p.add_argument("--retention-plot", metavar="PATH", default=None,
                   help="with --video: a retention timeline PNG per question (PATH, or PATH-1.png, PATH-2.png, ... "
                        "for several): tokens in order (video frames with their times) x layers, coloured by the "
                        "KV heads still holding each token after the answer")
    p.set_defaults(func=run)


def add_window_args(group, window_frames: int, what: str) -> None:
    """`--window-frames` and `--frame-tokens`, shared with `dbtrimkv watch`."""
    group.add_argument("--window-frames", type=int, default=window_frames, metavar="N",
                       help=f"{what} (default: {window_frames})")
    group.add_argument("--frame-tokens", type=arguments.int_in(1, 16384), default=128, metavar="N",
                       help="at most this many vision tokens per frame group; fixes the frame size (default: 128)")


def add_answer_length_arg(p, default: int) -> None:
    p.add_argument("--max-new-tokens", type=arguments.new_tokens, default=default, metavar="N",
                   help=f"tokens to generate per answer at most (default: {default})")


def run(args) -> int:
    _check_cache_args(args)
    if args.load_cache is None and (args.video is None) == (args.dataset is None):
        raise ConfigError("give either --video PATH with questions, or --dataset FILE")
    if args.video is not None and not args.questions:
        raise ConfigError("give at least one question after --video PATH")
    if args.dataset is not None and (args.questions or args.format is None or args.output is None):
        raise ConfigError("--dataset takes --format and --output, and no questions on the command line")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.dataset is not None:  # predictions and metrics are written as the run goes: both must be writable now
        check_writable_file(args.output, "--output")
        check_writable_file(runner.metrics_path(args.output), "--output")
    if args.retention_plot is not None:
        if args.video is None and args.load_cache is None:
            raise ConfigError("--retention-plot goes with --video or --load-cache (one plot per question)")
        retention_timeline.check_output(args.retention_plot)
    options = video_qa.StreamOptions(fps=args.fps, max_frames=args.max_frames, window_frames=args.window_frames,
                            frame_tokens=args.frame_tokens)
    progress = show_progress(args)
    if args.model is None:
        print(TINY_NOTICE, file=sys.stderr)
    model, processor = checkpoints.load_model(args.model, device=args.device, dtype=args.dtype)
    qa = video_qa.VideoQA(model, processor, eviction_config(args, model), options, args.max_new_tokens,
                          progress=progress)
    return _single(qa, args) if args.dataset is None else _dataset(qa, args)


def _check_cache_args(args) -> None:
    """--save-cache / --load-cache: their combinations, the output folder and the input's format."""
    if args.save_cache is not None:
        if args.video is None:
            raise ConfigError("--save-cache goes with --video (it saves that video's compressed cache)")
        check_writable_file(args.save_cache, "--save-cache")
    if args.load_cache is not None:
        if args.video is not None or args.dataset is not None:
            raise ConfigError("--load-cache replaces --video and --dataset: give one of them")
        if not args.questions:
            raise ConfigError("give at least one question after --load-cache FILE")
        portable.read_metadata(args.load_cache)  # a missing or foreign file fails before the model loads


def _encoded(qa, args):
    """The video's compressed cache: loaded from --load-cache, or encoded (and saved to --save-cache)."""
    if args.load_cache is not None:
        encoded = saved.load_encoded(qa.model, qa.processor, args.load_cache)
        print(f"loaded {args.load_cache}: video {encoded.path} (not decoded again)", file=sys.stderr)
        return encoded
    encoded = qa.encode(args.video)
    if args.save_cache is not None:
        size = saved.save_encoded(qa.model, encoded, args.save_cache)
        print(f"saved the compressed video cache to {args.save_cache} ({stats_text.format_bytes(size)})", file=sys.stderr)
    return encoded


def _single(qa, args) -> int:
    encoded = _encoded(qa, args)
    c = encoded.cache
    now, config = c.num_entries(0), c.config
    rule = stats_text.eviction_line(c.budget, config.policy, c.num_layers, c.num_kv_heads, config.buffer_size,
                                    config.prefill_chunk, now=now)
    print(f"video: {encoded.frames} frames in {encoded.frame_groups} frame groups, "
          f"{encoded.prompt_tokens['video']} video tokens, encoded in {encoded.seconds:.2f} s | "
          f"KV after the video: {stats_text.entries(now)} now, peak {max(c.peak_entries)}, "
          f"{stats_text.budget_words(c.budget, config.policy)}, storage {stats_text.format_bytes(c.storage_bytes())} "
          f"allocated\n  {stats_text.entry_line(c.num_layers, c.num_kv_heads)}\n  {rule}", file=sys.stderr)
    for number, question in enumerate(args.questions, 1):
        answer = qa.ask(encoded, question)
        print(f"Q: {question}\nA: {answer.text}", flush=True)
        if args.retention_plot is not None:
            _plot(qa, encoded, answer, args.retention_plot, number if len(args.questions) > 1 else None)
        s = answer.stats
        print(f"{s.summary()}\npeak KV entries: {s.peak_kv_entries} | KV storage: "
              f"{stats_text.format_bytes(s.kv_storage_bytes)} allocated ({s.kv_storage_bytes} bytes)", file=sys.stderr)
    return 0


def _plot(qa, encoded, answer, path: str, number: int | None) -> None:
    """The answering fork's timeline; the video's token ids come from the encoding (a cache keeps positions)."""
    path = Path(path)
    if number is not None:
        path = path.with_name(f"{path.stem}-{number}{path.suffix}")
    cache = answer.cache
    retention_timeline.save(cache, retention_timeline.fork_tokens(encoded.token_ids, cache), qa.processor.tokenizer, path,
         title=f"retention timeline after: {answer.question!r} ({cache.config.policy}, "
               f"{stats_text.budget_words(cache.budget, cache.config.policy)})")
    print(f"retention timeline: {path}", file=sys.stderr)


def _dataset(qa, args) -> int:
    items = video_qa.load_dataset(args.dataset, args.format, args.video_dir)[: args.limit]
    settings = {"model": args.model or "tiny-recall", "eviction": qa.config.to_dict(), "stream": vars(qa.options),
                "max_new_tokens": args.max_new_tokens}
    metrics = video_qa.run_dataset(qa, items, args.output, progress=qa.progress, settings=settings)
    acc = "n/a" if metrics["accuracy"] is None else f"{100 * metrics['accuracy']:.2f}%"
    errors = f"errors: {metrics['errors']}" + (" (videos that failed: not in the accuracy)" if metrics["errors"] else "")
    print(f"accuracy: {acc} ({metrics['correct']}/{metrics['total']}) | unparsed answers: {metrics['unparsed']} | "
          f"{errors} | predictions: {args.output} | metrics: {runner.metrics_path(args.output)}")
    ids = {item.id for item in items}
    kv = [r["kv"] for i, r in runner.load_predictions(args.output).items() if i in ids and "kv" in r]
    if kv:
        print(f"KV: peak entries {max(k['peak_entries'] for k in kv)}, storage "
              f"{stats_text.format_bytes(max(k['storage_bytes'] for k in kv))} (max over questions)", file=sys.stderr)
    return 0
