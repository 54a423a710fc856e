"""`dbtrimkv eval`: the synthetic recall benchmark and the recipes behind its model.

- `dbtrimkv eval synthetic --policies global streaming ... --budgets 0.05 0.1 ...` runs eviction
  policies on held-out synthetic prompts in the same engine and writes JSON, a markdown table and
  a plot (accuracy vs budget).
- `dbtrimkv eval export-lmms DIR` writes the same prompts as an offline lmms-eval task
  (`dbtrimkv.lmms.recall_export`).
- `dbtrimkv eval long-video --minutes 1 5 30 60 ...` streams synthetic videos of growing length
  through video-qa's windowed path and writes accuracy and memory vs length (JSON, markdown, plots).
- `dbtrimkv eval train-recall --config configs/recall-tiny.yaml` trains the tiny recall model.
- `dbtrimkv eval train-gates --config configs/train-recall-gates.yaml` trains its retention gates
  with `dbtrimkv.training` on recall data and saves them next to the model.
- `dbtrimkv eval soup-gates START END --alpha A --output FILE` averages two gate files of one model
  (`dbtrimkv.recall.gate_soup`: how the shipped gates are made from stages 2 and 3).
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConfigError
from ..settings.limits import MAX_BUFFER_SIZE, MAX_PREFILL_CHUNK
from ..reporting.output_paths import check_writable_dir, check_writable_file, timestamped
from ..settings.presets import load_yaml
from . import arguments
from .common import add_model_args, add_progress_arg, show_progress
from .lazy import lazy

calibration = lazy("dbtrimkv.cache.calibration")
harness = lazy("dbtrimkv.eval.harness")
long_video = lazy("dbtrimkv.eval.long_video")
long_video_report = lazy("dbtrimkv.eval.long_video_report")
loading = lazy("dbtrimkv.loading.models")
gate_soup = lazy("dbtrimkv.recall.gate_soup")
recall_export = lazy("dbtrimkv.lmms.recall_export")
report = lazy("dbtrimkv.eval.report")
train_gates_module = lazy("dbtrimkv.recall.train_gates")
train_model = lazy("dbtrimkv.recall.train_model")

# As `dbtrimkv.recall` names them (checked by tests/test_lazy_cli.py), stated here so the parser imports no torch.
TASK_KINDS = ("cards", "video", "image")
GATE_DATA = "gate_data"
REPORT_SUFFIXES = (".json", ".md", ".png")
OUTPUT_HELP = ("output prefix: writes PREFIX.json, PREFIX.md and PREFIX.png (default: {name}-YYYYMMDD-HHMMSS in the "
               "working directory; checked writable before the run starts)")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="synthetic recall benchmark and its training recipes",
                       description="Measure eviction policies on a task with known answers.")
    eval_sub = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND")
    _add_synthetic(eval_sub)
    _add_export_lmms(eval_sub)
    _add_long_video(eval_sub)
    _add_train_recall(eval_sub)
    _add_train_gates(eval_sub)
    _add_soup_gates(eval_sub)


def _add_synthetic(sub) -> None:
    p = sub.add_parser("synthetic", help="accuracy of eviction policies vs KV budget on synthetic recall",
                       description="Answer held-out synthetic recall prompts under each policy and budget (a fraction "
                                   "of the full cache, converted per prompt to an entry budget). Writes JSON, a "
                                   "markdown table and a PNG plot.")
    p.add_argument("--policies", nargs="+", default=["global", "head", "streaming", "snapkv", "h2o", "knorm", "random"],
                   choices=arguments.POLICY_NAMES, metavar="POLICY",
                   help=f"policies to compare (choices: {', '.join(arguments.POLICY_NAMES)})")
    p.add_argument("--budgets", nargs="+", type=arguments.fraction, default=[0.02, 0.05, 0.1, 0.25, 0.5], metavar="FRACTION",
                   help="KV budgets as fractions of each prompt's full cache, in (0, 1]")
    p.add_argument("--kind", choices=tuple(TASK_KINDS), default="cards",
                   help="card stream, video clip or single image prompts")
    p.add_argument("--examples", type=arguments.int_in(1, 100_000), default=100, help="held-out prompts (seeds 0..N-1; default: 100)")
    _add_recall_task_args(p)
    p.add_argument("--prefill-chunk", type=arguments.int_in(1, MAX_PREFILL_CHUNK), default=32, help="prompt tokens per prefill step (default: 32)")
    p.add_argument("--buffer-size", type=arguments.int_in(0, MAX_BUFFER_SIZE), default=0, help="tokens between evictions while decoding")
    _add_calibration_args(p)
    p.add_argument("--threshold", type=arguments.fraction, default=None, metavar="TAU",
                   help="tau of the threshold policy (needed when it is among --policies): it drops entries whose "
                        "decayed retention is below tau, and each budget stays its hard cap")
    p.add_argument("--output", default=None, metavar="PREFIX", help=OUTPUT_HELP.format(name="synthetic_recall"))
    add_model_args(p, default="the shipped tiny-recall model")
    add_progress_arg(p)
    p.set_defaults(func=run_synthetic)


def _add_recall_task_args(p) -> None:
    """The recall prompts' parameters, shared by `synthetic` and `export-lmms` (same flags, same prompts)."""
    p.add_argument("--num-cards", type=arguments.int_in(1, 1000), default=8)
    p.add_argument("--filler", type=arguments.int_in(0, 100_000), default=32, help="filler characters between cards / around the clip")
    p.add_argument("--distractors", type=arguments.int_in(0, 100), default=1, help="distractor images between two cards")
    p.add_argument("--frames", type=arguments.int_in(1, 1000), default=8, help="video frames (--kind video)")
    p.add_argument("--image-size", type=arguments.int_in(8, 1024), default=32)
    p.add_argument("--answer-modality", choices=("image", "text", "any"), default="any")
    p.add_argument("--needle", type=arguments.unit_interval, default=None, help="place of the queried card / frame in [0, 1] "
                   "(default: random)")


def _add_export_lmms(sub) -> None:
    p = sub.add_parser("export-lmms", help="write the synthetic recall prompts as an offline lmms-eval task",
                       description="Write the held-out recall prompts of `eval synthetic` (seeds 0..N-1 of each kind, "
                                   "the same task flags) to DIR as the lmms-eval task dbtrimkv_recall: a YAML, a "
                                   "JSONL of documents and PNG media. Run it with lmms-eval --model dbtrimkv "
                                   "--tasks dbtrimkv_recall --include_path DIR.")
    p.add_argument("directory", metavar="DIR", help="output directory (created)")
    p.add_argument("--kinds", nargs="+", choices=tuple(TASK_KINDS), default=list(TASK_KINDS),
                   help="prompt kinds to export (default: cards image video)")
    p.add_argument("--examples", type=arguments.int_in(1, 100_000), default=20,
                   help="prompts per kind (seeds 0..N-1; default: 20)")
    _add_recall_task_args(p)
    p.set_defaults(func=run_export_lmms, policies=[], budgets=[], prefill_chunk=32, buffer_size=0, threshold=None)


def _add_calibration_args(p) -> None:
    """The retention calibration of the bounded policies (`DBTrimKVConfig.video_decay_scale` / `decay_floor`)."""
    p.add_argument("--video-decay-scale", type=arguments.float_in(0.0, 1.0, low_open=True), default=1.0, metavar="S",
                   help="video tokens' log beta x S, in (0, 1] (dbtrimkv/cache/calibration.py; default 1: none)")
    p.add_argument("--decay-floor", type=arguments.float_in(0.0, 1.0), default=0.0, metavar="F",
                   help="text and image tokens' log beta capped at -F, in [0, 1]; video tokens follow the scale alone "
                        "(default 0: none)")


def _add_long_video(sub) -> None:
    p = sub.add_parser("long-video", help="accuracy and memory vs video length (1 min to an hour) per policy",
                       description="Stream synthetic videos (a digit shown on 3 consecutive frames at a random "
                                   "time among distractor frames, the question at the end) through video-qa's windowed path at one memory "
                                   "size, for each length and policy, and the full cache up to a KV memory cap. "
                                   "Writes JSON, markdown tables and a PNG (accuracy and memory vs length).")
    p.add_argument("--minutes", nargs="+", type=float, default=[1, 2, 5, 10, 30, 60], metavar="MIN",
                   help="video lengths in minutes (default: 1 2 5 10 30 60)")
    p.add_argument("--fps", type=float, default=1.0, help="frames per second of the videos (default: 1)")
    p.add_argument("--examples", type=int, default=4, help="videos per length (seeds --first-seed onwards; default: 4)")
    p.add_argument("--first-seed", type=int, default=0, metavar="SEED",
                   help="first video seed (default: 0, the benchmark's videos); other seeds give held-out videos "
                        "to tune on")
    p.add_argument("--policies", nargs="+", default=["global", "head", "streaming", "snapkv", "h2o"],
                   choices=arguments.POLICY_NAMES, metavar="POLICY", help="policies besides the full cache")
    p.add_argument("--memory-size", type=int, default=32, metavar="M",
                   help="entries per (layer, KV head) for every policy (default: 32)")
    _add_calibration_args(p)
    p.add_argument("--full-cache-cap-mb", type=float, default=16.0, metavar="MIB",
                   help="KV storage the full cache may use before it counts as out of memory (default: 16)")
    p.add_argument("--window-frames", type=int, default=16, help="frames per prefill window (default: 16)")
    p.add_argument("--timeline-minutes", type=float, default=None, metavar="MIN",
                   help="also draw the retention timeline of `global` on the first video of this length "
                        "(one of --minutes) to OUTPUT-timeline.png")
    p.add_argument("--output", default=None, metavar="PREFIX", help=OUTPUT_HELP.format(name="long_video")
                   + "; with --timeline-minutes also PREFIX-timeline.png")
    add_model_args(p, default="the shipped tiny-recall model")
    add_progress_arg(p)
    p.set_defaults(func=run_long_video)


def _add_train_recall(sub) -> None:
    p = sub.add_parser("train-recall", help="train the tiny recall Qwen3-VL from scratch",
                       description="Train the recall model of a recipe (configs/recall-tiny.yaml: from scratch; "
                                   "configs/recall-tiny-clips.yaml: continued on long clips) on one CPU thread and "
                                   "save it (safetensors + processor) to the recipe's output.")
    p.add_argument("--config", default="recall-tiny", help="recipe YAML or preset name (default: recall-tiny)")
    p.add_argument("--output", default=None, help="model directory (default: the recipe's output)")
    p.add_argument("--steps", type=arguments.positive_int, default=None, help="override the recipe's step count")
    p.add_argument("--threads", type=arguments.int_in(1, 1024), default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--device", default="cpu", type=arguments.device, help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT/resume/ if a checkpoint is there (the recipe's checkpoint_every "
                        "writes it); the resumed run ends with the same weights as an uninterrupted one")
    p.add_argument("--stop-at", type=arguments.positive_int, default=None, metavar="STEP",
                   help="end this session after STEP with a checkpoint (continue later with --resume)")
    p.set_defaults(func=run_train_recall)


def _add_train_gates(sub) -> None:
    p = sub.add_parser("train-gates", help="train retention gates of the recall model on recall data",
                       description="Distil rg10 gates with a global capacity loss (dbtrimkv.training) on synthetic "
                                   "recall prompts and save them next to the model (save_gates).")
    p.add_argument("--config", default="train-recall-gates", help="training YAML (default: train-recall-gates)")
    p.add_argument("--examples", type=arguments.int_in(1, 10_000_000), default=2000, help="recall chats written as training data (default: 2000)")
    p.add_argument("--serve-memory-size", type=arguments.positive_int, default=None, metavar="M",
                   help="memory size M saved as the gates' default eviction, what `dbtrimkv chat` / the demo use "
                        "without budget options (default: the training memory_size)")
    p.add_argument("--recipe", default="recall-tiny-clips",
                   help="the model's training recipe: its mixture (and gate_data section) draws the chats, its "
                        "output is the model the gates are trained for and saved into (default: recall-tiny-clips, "
                        "the shipped model's)")
    p.add_argument("--gate-data", default=GATE_DATA, metavar="SECTION",
                   help=f"the recipe section that updates its mixture for the gates' chats (default: {GATE_DATA})")
    p.add_argument("--continue-gates", action="store_true",
                   help="start from the gates the model already holds (a later stage) instead of fresh ones")
    p.add_argument("--threads", type=arguments.int_in(1, 1024), default=1, help="torch CPU threads (default: 1)")
    p.set_defaults(func=run_train_gates)


def _add_soup_gates(sub) -> None:
    p = sub.add_parser("soup-gates", help="average two gate files of one model (weight-space soup)",
                       description="Write (1 - alpha) x START + alpha x END, two gate safetensors files of the same "
                                   "model (e.g. two training stages), to --output; the shipped tiny-recall gates are "
                                   "stage 2 and stage 3 at alpha 0.4.")
    p.add_argument("start", metavar="START", help="gate weights at alpha 0 (a dbtrimkv_gates.safetensors)")
    p.add_argument("end", metavar="END", help="gate weights at alpha 1")
    p.add_argument("--alpha", type=arguments.unit_interval, required=True, help="weight of END, in [0, 1]")
    p.add_argument("--output", required=True, metavar="FILE", help="the averaged gates (may be START or END)")
    p.set_defaults(func=run_soup_gates)


def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)


def run_synthetic(args) -> int:
    if ("threshold" in args.policies) != (args.threshold is not None):
        raise ConfigError("the threshold policy needs its tau: pass --threshold TAU with --policies ... threshold"
                          if args.threshold is None else
                          "--threshold is the threshold policy's tau: add threshold to --policies or drop it")
    args.output = _report_prefix(args.output, "synthetic_recall")
    spec = harness.BenchmarkSpec.from_args(args)
    with _recall_task_checked():  # before the model loads
        spec.make_task()
    show_progress(args)  # the model download's bars
    _log_to_stderr()
    results = harness.run_benchmark(spec, args.model, device=args.device, dtype=args.dtype)
    paths = report.write_report(results, args.output, command=" ".join(["dbtrimkv", *sys.argv[1:]]))
    print("\n".join(str(p) for p in paths))
    return 0


def run_export_lmms(args) -> int:
    check_writable_dir(args.directory, "DIR")
    with _recall_task_checked():
        prompts = {kind: harness.BenchmarkSpec.from_args(argparse.Namespace(**dict(vars(args), kind=kind))).prompts()
                   for kind in dict.fromkeys(args.kinds)}
    print(recall_export.export_task(args.directory, prompts))
    return 0


@contextmanager
def _recall_task_checked():
    """The recall task classes check their own parameters (`recall/tasks.py` owns the rules): a
    ValueError there is one CLI error, the same for `synthetic` and `export-lmms`."""
    try:
        yield
    except ValueError as exc:
        raise ConfigError(f"recall task: {exc}") from None


def run_long_video(args) -> int:
    if any(m <= 0 for m in args.minutes) or args.fps <= 0 or args.examples < 1 or args.memory_size < 1:
        raise ConfigError("--minutes and --fps must be > 0, --examples and --memory-size at least 1")
    if args.first_seed < 0:
        raise ConfigError(f"--first-seed must be >= 0, got {args.first_seed}")
    if args.full_cache_cap_mb <= 0 or args.window_frames < 1:
        raise ConfigError("--full-cache-cap-mb must be > 0 and --window-frames at least 1")
    if args.timeline_minutes is not None and (args.timeline_minutes not in args.minutes or "global" not in args.policies):
        raise ConfigError("--timeline-minutes must be one of --minutes, with global among --policies")
    args.output = _report_prefix(args.output, "long_video")
    timeline = Path(f"{args.output}-timeline.png") if args.timeline_minutes is not None else None
    if timeline is not None:
        check_writable_file(timeline, "--output")
    show_progress(args)  # the model download's bars
    _log_to_stderr()
    spec = long_video.LongVideoSpec(minutes=sorted(args.minutes), fps=args.fps, examples=args.examples, policies=args.policies,
                         memory_size=args.memory_size, full_cache_cap_mb=args.full_cache_cap_mb,
                         window_frames=args.window_frames, timeline_minutes=args.timeline_minutes,
                         first_seed=args.first_seed, calibration=calibration.settings_from(args))
    if timeline is not None:
        timeline.parent.mkdir(parents=True, exist_ok=True)
    results = long_video.run_long_video(spec, args.model, device=args.device, dtype=args.dtype, timeline_path=timeline)
    paths = long_video_report.write_report(results, args.output, command=" ".join(["dbtrimkv", *sys.argv[1:]]))
    paths += [timeline] if timeline is not None else []
    print("\n".join(str(p) for p in paths))
    return 0


def _report_prefix(output: str | None, what: str) -> str:
    """The report prefix (default: `what`-YYYYMMDD-HHMMSS here), its .json/.md/.png checked writable."""
    prefix = output if output is not None else timestamped(what)
    for suffix in REPORT_SUFFIXES:
        check_writable_file(Path(prefix).with_suffix(suffix), "--output")
    return prefix


def _recipe_value(recipe: str, key: str):
    try:
        return load_yaml(recipe).get(key)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None


def run_train_recall(args) -> int:
    output = args.output if args.output is not None else _recipe_value(args.config, "output")
    if output is not None:
        check_writable_dir(output, "--output" if args.output is not None else f"the output of {args.config}")
    _log_to_stderr()
    scores = train_model.train(args.config, output=args.output, steps=args.steps, threads=args.threads,
                   device=str(loading.resolve_device(args.device)), resume=args.resume,
                   stop_at=args.stop_at)
    print(" ".join(f"{k}={v:.3f}" for k, v in scores.items()))
    return 0


def run_train_gates(args) -> int:
    # the gates are saved into the recipe's model (its output) and trained in the config's output_dir
    for name, key in ((args.recipe, "output"), (args.config, "output_dir")):
        folder = _recipe_value(name, key)
        if folder is not None:
            check_writable_dir(folder, f"the {key} of {name}")
    _log_to_stderr()
    print(train_gates_module.train_gates(args.config, examples=args.examples, threads=args.threads,
                      serve_memory_size=args.serve_memory_size, recipe=args.recipe, gate_data=args.gate_data,
                      continue_gates=args.continue_gates))
    return 0



def run_soup_gates(args) -> int:
    check_writable_file(args.output, "--output")
    print(gate_soup.soup_gates(args.start, args.end, args.alpha, args.output))
    return 0
