"""Real shapes on CPU: a Qwen3-VL-4B-shaped bf16 model on a photo + 2k tokens of text and on a
10-minute video at 1 fps, ours at M=128 / M=512 vs transformers' full cache; then real media sizes
(1920x1080 and 4000x3000 photos, a 2-minute 720p 30 fps video) through the real Qwen3-VL processor
settings and the engine with chunked prefill and eviction.

Everything is real except the weights (random) and, where chosen, the depth: the first table runs
`--layers` text layers and `--vision-depth` vision blocks at full width (default: all 36 and all
24, 8.27 GiB of bf16 weights); the real-media table runs on its own model, `--media-layers` /
`--media-vision-depth` (default 1 / 1: a 4000x3000 photo is 47,000 patches in one vision sequence).
The 36-layer weights are counted exactly on the meta device; when fewer layers ran, 36-layer KV
figures are the measured per-layer bytes x 36.

Measured per run, in one process (ratios compare like with like): prefill (prompt in, first token
out) and decode per token in process CPU time (the ratios; wall time beside it: on a shared core
another job stretches wall time, not this process's CPU time), KV bytes (transformers'
DynamicCache tensors vs our slot pool as allocated), peak RSS during the run (sampled from
/proc/self/statm). Writes JSON to `--out` and a markdown table beside it (`.md`) after every row.

    OMP_NUM_THREADS=1 nice -n 10 python bench/bench_real_shapes.py --out bench/results/real_shapes_cpu.json
    OMP_NUM_THREADS=1 python bench/bench_real_shapes.py --skip-media   # first table only, keep the media table
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import dbtrimkv
from dbtrimkv.loading import shapes
from dbtrimkv.inputs.prompts import VideoOptions, build_inputs, tokens_by_modality
from dbtrimkv.modeling.transformers_compat import cache_kwargs

SHAPE = "qwen3-vl-4b"
GIB = 1 << 30
PAGE = os.sysconf("SC_PAGE_SIZE")
_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc; None elsewhere (then rows share the heap)


class PeakRSS:
    """Samples this process's resident set size every few ms; `peak` since the last `reset()`."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval)

    def reset(self) -> None:
        """Start a row: collect garbage and hand the heap the previous row freed back to the OS (glibc keeps
        it otherwise), so every row's peak starts from the model, not from the rows before it."""
        gc.collect()
        if _TRIM is not None:
            _TRIM(0)
        self.peak = self.current()

    def stop(self):
        self._stop.set()


def now() -> tuple[float, float]:
    """(process CPU seconds, wall seconds). CPU time is the measure on a shared machine: another job
    on the same core stretches wall time, not the CPU time this process spends (all its threads)."""
    return time.process_time(), time.perf_counter()


class StepClock:
    """A stopping criterion that only records when each generated token came out (CPU and wall)."""

    def __init__(self):
        self.stamps: list[tuple[float, float]] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.stamps.append(now())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-sized image with smooth structure and sensor-like noise (content does not matter)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / (37 + 11 * c) + y / (53 + 7 * c)) for c in range(3)], -1)
    base += rng.normal(0, 12, size=(height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def synthetic_frames(count: int, width: int, height: int) -> list[np.ndarray]:
    """`count` frames of a moving pattern (a 10-minute clip at 1 fps, kept in memory at this size)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    return [np.clip(np.stack([128 + 100 * np.sin((x + 7 * t) / (29 + 9 * c) + y / 41) for c in range(3)], -1),
                    0, 255).astype(np.uint8) for t in range(count)]


def write_720p_clip(path: Path, seconds: int, fps: int = 30) -> Path:
    """A 1280x720 `fps` mp4 of `seconds` seconds (a sliding gradient with a moving block: compresses
    to a few MB), written with PyAV."""
    import av

    width, height = 1280, 720
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x // 5 + c * 40) % 256 for c in range(3)], -1).astype(np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 2_000_000
        for t in range(seconds * fps):
            frame = np.roll(base, 4 * t, axis=1)
            top, left = (t * 3) % (height - 120), (t * 7) % (width - 160)
            frame[top:top + 120, left:left + 160] = (255 - 2 * (t % 100), 80, 2 * (t % 120))
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def chat(media: dict, text: str):
    return [{"role": "user", "content": [media, {"type": "text", "text": text}]}]


def filler_text(tokens: int) -> str:
    """About `tokens` tokens of text for the byte-level tokenizer (one token per byte)."""
    sentence = "The slot pool keeps every cached entry in place while the gates decide what stays. "
    return (sentence * (tokens // len(sentence) + 1))[:tokens]


def hf_kv_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def timed(result: dict, clock: StepClock, start: tuple[float, float]) -> dict:
    """Prefill (prompt in, first token out) and decode per token, in process CPU time (`*_cpu_*`,
    what the ratios use) and wall time (`*_wall_*`, stretched by whatever else ran on the core)."""
    stamps, steps = clock.stamps, max(len(clock.stamps) - 1, 1)
    for i, kind in enumerate(("cpu", "wall")):
        result[f"prefill_{kind}_s"] = round(stamps[0][i] - start[i], 3)
        result[f"decode_{kind}_ms_per_token"] = round(1000 * (stamps[-1][i] - stamps[0][i]) / steps, 2)
    result["decode_tokens"] = len(stamps)
    return result


@torch.no_grad()
def run_hf(model, inputs, rss: PeakRSS, decode_tokens: int) -> dict:
    from transformers import DynamicCache

    rss.reset()
    before = rss.current()
    cache = DynamicCache(config=model.config)
    clock = StepClock()
    start = now()
    model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
                   do_sample=False, stopping_criteria=[clock])
    result = timed({"cache": "hf full"}, clock, start)
    result.update(kv_bytes=hf_kv_bytes(cache), rss_before_gib=round(before / GIB, 3), peak_rss_gib=round(rss.peak / GIB, 3),
                  peak_rss_over_model_gib=round((rss.peak - before) / GIB, 3))
    del cache
    return result


@torch.no_grad()
def run_ours(model, inputs, rss: PeakRSS, memory_size: int, decode_tokens: int, chunk: int) -> dict:
    rss.reset()
    before = rss.current()
    config = dbtrimkv.DBTrimKVConfig(memory_size=memory_size, buffer_size=128, prefill_chunk=chunk)
    cache = dbtrimkv.DBTrimKVCache(model, config)
    clock = StepClock()
    start = now()
    dbtrimkv.generate(model, inputs, cache, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
                      do_sample=False, stopping_criteria=[clock])
    result = timed({"cache": f"ours M={memory_size}"}, clock, start)
    bound = cache.budget + cache.segments_per_sequence * max(config.buffer_size, chunk)
    result.update(kv_bytes=cache.storage_bytes(), kv_entries=cache.num_entries(0), bound_entries=bound,
                  bound_bytes=bound * cache.entry_bytes(), rss_before_gib=round(before / GIB, 3), evictions=cache.num_evictions,
                  kept_by_modality=cache.retained_by_modality(0),
                  peak_rss_gib=round(rss.peak / GIB, 3), peak_rss_over_model_gib=round((rss.peak - before) / GIB, 3))
    del cache
    return result


def weights_bytes(num_layers: int | None, vision_depth: int | None) -> int:
    """Exact parameter bytes (bf16) of the shape at that depth, counted on the meta device."""
    from transformers import AutoModelForImageTextToText

    config = shapes.build_config(SHAPE, num_layers, vision_depth)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def prompt_summary(inputs) -> dict:
    out = {"prompt_tokens": int(inputs["input_ids"].shape[1]), **tokens_by_modality(inputs, 0)}
    for key in ("image_grid_thw", "video_grid_thw"):
        if inputs.get(key) is not None:
            out[key] = inputs[key].tolist()
    return out


def depth(value: str) -> int | None:
    """A depth flag: a positive count, or `all` (None: the shape's full depth)."""
    if value == "all":
        return None
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive count or 'all', got {value!r}")
    return int(value)


SCENARIOS = ("photo", "video")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=depth, default=None, help="text layers of the first table (default: all 36)")
    parser.add_argument("--vision-depth", type=depth, default=None,
                        help="vision blocks of the first table (default: all 24)")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS),
                        help="first-table prompts to run; the others' rows of an earlier run in --out are kept")
    parser.add_argument("--media-layers", type=depth, default=1, help="text layers of the real-media table")
    parser.add_argument("--media-vision-depth", type=depth, default=1, help="vision blocks of the real-media table")
    parser.add_argument("--decode-tokens", type=int, default=6)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--ram-gib", type=float, default=24.0)
    parser.add_argument("--video-minutes", type=float, default=10.0)
    parser.add_argument("--clip-seconds", type=int, default=120, help="length of the 720p 30 fps clip")
    parser.add_argument("--skip-media", action="store_true",
                        help="only the first table (photo + text, 1-fps video); the real-media table of an "
                             "earlier run in --out is kept, marked as such")
    parser.add_argument("--out", type=Path, default=Path("bench/results/real_shapes_cpu.json"))
    parser.add_argument("--tables-only", action="store_true",
                        help="run nothing: recompute the ratios and the fit statement of --out (e.g. after a "
                             "cut-short run) and rewrite its markdown")
    args = parser.parse_args()
    text = shapes.load_shape(SHAPE)["text"]
    L, H, D = text["num_hidden_layers"], text["num_key_value_heads"], text["head_dim"]
    if args.tables_only:
        report = json.loads(args.out.read_text())
        finish_tables(report, report["scenarios"], args, L)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(markdown(report) + "\n")
        print(markdown(report))
        return
    layers, vision_blocks = args.layers or L, args.vision_depth or shapes.load_shape(SHAPE)["vision"]["depth"]
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    rss = PeakRSS()
    report: dict = {"shape": SHAPE, "dtype": "bfloat16", "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "machine": platform.machine(),
                    "timing": "process CPU time (time.process_time) for the ratios; wall time alongside"}
    full = weights_bytes(None, None)
    ran = weights_bytes(layers, vision_blocks)
    report["memory"] = {"weights_36_layers_gib": round(full / GIB, 3), "weights_36_layers_fit": full < args.ram_gib * GIB,
                        "hf_kv_bytes_per_token_36_layers": 2 * L * H * D * 2}
    print(json.dumps(report, indent=1), flush=True)

    t0 = time.perf_counter()
    model, processor = shapes.build_model(SHAPE, num_layers=layers, vision_depth=vision_blocks, dtype=torch.bfloat16)
    built = {"layers": layers, "vision_depth": vision_blocks, "weights_run_gib": round(ran / GIB, 3),
             "build_wall_s": round(time.perf_counter() - t0, 1), "rss_after_build_gib": round(rss.current() / GIB, 3)}
    names = {"photo": "photo 1920x1080 + 2k text", "video": f"video {args.video_minutes:g} min @1fps (160x96)"}
    chats = {}
    if "photo" in args.scenarios:
        chats[names["photo"]] = [chat({"type": "image", "image": photo(1920, 1080)}, filler_text(2000))]
    if "video" in args.scenarios:
        frames = synthetic_frames(int(args.video_minutes * 60), 160, 96)
        chats[names["video"]] = [chat({"type": "video", "video": frames, "fps": 1.0}, "What happens in this video?")]
    inputs = {name: build_inputs(processor, messages) for name, messages in chats.items()}
    del chats
    results = {}
    for key, name in names.items():  # in table order; rows of scenarios not run now are kept
        if name in inputs:
            results[name] = {"prompt": prompt_summary(inputs[name]), **built, "runs": []}
        elif name in previous.get("scenarios", {}):
            results[name] = dict(previous["scenarios"][name], kept_from_previous_run=True)
            results[name].setdefault("layers", previous.get("layers"))
            results[name].setdefault("vision_depth", previous.get("vision_depth"))
    report["scenarios"] = results

    def save():  # after every run, so a cut-short run still leaves its numbers
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(markdown(report) + "\n")
    for name, inp in inputs.items():  # the plain model first (no gates, no hooks)
        print(f"[hf] {name} {results[name]['prompt']['prompt_tokens']} tokens", flush=True)
        results[name]["runs"].append(run_hf(model, inp, rss, args.decode_tokens))
        print(results[name]["runs"][-1], flush=True)
        save()
    dbtrimkv.attach_retention_gates(model)
    for name, inp in inputs.items():
        for memory_size in (128, 512):
            print(f"[ours M={memory_size}] {name}", flush=True)
            results[name]["runs"].append(run_ours(model, inp, rss, memory_size, args.decode_tokens, args.chunk))
            print(results[name]["runs"][-1], flush=True)
            save()
    del inputs
    finish_tables(report, results, args, L)
    save()
    if args.skip_media:
        if previous.get("media"):
            report["media"] = previous["media"]
            report["media_source"] = dict(previous.get("media_source") or {"layers": previous.get("layers"),
                                                                            "vision_depth": previous.get("vision_depth")},
                                          kept_from_previous_run=True)
    else:
        del model
        gc.collect()
        report["media"] = {}
        report["media_source"] = {"kept_from_previous_run": False, "layers": args.media_layers,
                                  "vision_depth": args.media_vision_depth}
        model, processor = shapes.build_model(SHAPE, num_layers=args.media_layers,
                                              vision_depth=args.media_vision_depth, dtype=torch.bfloat16)
        dbtrimkv.attach_retention_gates(model)
        media_runs(model, processor, rss, args, report["media"], save)
    rss.stop()
    save()
    print(markdown(report))


RATIOS = ("prefill_cpu_s", "decode_cpu_ms_per_token", "kv_bytes", "peak_rss_gib")


def finish_tables(report: dict, results: dict, args, full_layers: int) -> None:
    """Each of our rows against the full-cache row of the same prompt (same process), and the fit."""
    for entry in results.values():
        runs = entry.get("runs", [])
        if runs and runs[0]["cache"] == "hf full":
            for run in runs[1:]:
                run["vs_hf"] = {k: round(run[k] / runs[0][k], 3) for k in RATIOS if runs[0][k]}
    report["fit"] = fit_statement(report, results, args, full_layers)


def fit_statement(report: dict, results: dict, args, full_layers: int) -> dict | None:
    """Where the full cache stops fitting in `--ram-gib` at 36 layers, from measured bytes: KV per
    token from the full cache's measured size (scaled to 36 layers if that row ran fewer), weights
    at 36 layers plus the runtime (RSS after building minus weights) of the deepest model run, and
    the full cache's one-shot prefill memory above the model and its KV, per prompt token, from its
    longest row (measured at that row's depth; extrapolated linearly in the prompt length)."""
    rows = [entry for entry in results.values() if entry.get("runs") and "rss_before_gib" in entry["runs"][0]]
    if not rows:
        return None
    longest = max(rows, key=lambda entry: entry["prompt"]["prompt_tokens"])
    deepest = max(rows, key=lambda entry: entry["layers"])
    hf = longest["runs"][0]
    cached = longest["prompt"]["prompt_tokens"] + hf["decode_tokens"] - 1
    per_token = hf["kv_bytes"] / cached * full_layers / longest["layers"]
    weights = report["memory"]["weights_36_layers_gib"] * GIB
    runtime = (deepest["rss_after_build_gib"] - deepest["weights_run_gib"]) * GIB
    activations = max(0.0, (hf["peak_rss_gib"] - hf["rss_before_gib"]) * GIB - hf["kv_bytes"])
    act_per_token = activations / longest["prompt"]["prompt_tokens"]
    free = args.ram_gib * GIB - weights - runtime
    tokens_kv_only = int(free // per_token)
    out = {"ram_gib": args.ram_gib, "kv_from": longest["runs"][0]["cache"] + " " + str(longest["layers"]) + " layers",
           "kv_bytes_per_token_36_layers_measured": round(per_token),
           "non_kv_gib_36_layers": round((weights + runtime) / GIB, 3), "runtime_from_layers": deepest["layers"],
           "prefill_activation_bytes_per_token": round(act_per_token),
           "full_cache_max_tokens_36_layers": tokens_kv_only,
           "full_cache_max_tokens_36_layers_one_shot_prefill": int(free // (per_token + act_per_token)),
           "ours": {}}
    video = next((entry for name, entry in results.items() if name.startswith("video") and entry.get("runs")), None)
    if video is not None:
        per_frame = video["prompt"]["video"] / (args.video_minutes * 60)
        out.update(full_cache_max_video_minutes_at_1fps=round(tokens_kv_only / per_frame / 60, 1),
                   video_tokens_per_frame=round(per_frame, 1))
    for entry in rows:
        for run in entry["runs"][1:]:
            if "bound_bytes" in run:
                out["ours"][run["cache"]] = {
                    "kv_bound_gib_36_layers": round(run["bound_bytes"] * full_layers / entry["layers"] / GIB, 3)}
    return out


def media_runs(model, processor, rss: PeakRSS, args, out: dict, save) -> None:
    """Real media sizes through the real processor settings and the engine (ours, M=128); the
    1920x1080 photo is the photo scenario above."""
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        clip = write_720p_clip(Path(tmp) / "clip.mp4", args.clip_seconds)
        made = {"clip_write_s": round(time.perf_counter() - t, 1), "clip_mb": round(clip.stat().st_size / 1e6, 2)}
        items = {
            "photo 4000x3000": chat({"type": "image", "image": photo(4000, 3000, 2)}, "Describe the photo."),
            f"video {args.clip_seconds}s 720p 30fps @2fps": chat({"type": "video", "video": str(clip)},
                                                                "What happens?"),
        }
        for name, messages in items.items():
            rss.reset()
            t = time.perf_counter()
            inputs = build_inputs(processor, [messages], video=VideoOptions(fps=2.0, max_frames=None))
            entry = {"processor_s": round(time.perf_counter() - t, 2), "prompt": prompt_summary(inputs)}
            print(f"[media] {name} {entry['prompt']}", flush=True)
            entry["run"] = run_ours(model, inputs, rss, 128, 2, args.chunk)
            if name.startswith("video"):
                entry.update(made)
            out[name] = entry
            print(entry, flush=True)
            save()
            del inputs


def markdown(report: dict) -> str:
    """The tables of `report` (also of a partial one: rows not run yet are simply absent)."""
    lines = [f"Qwen3-VL-4B shape, bf16, at full width (all 36 layers: {report['memory']['weights_36_layers_gib']} "
             f"GiB of weights), {report['threads']} thread(s); depth = text layers / vision blocks. Times are "
             "process CPU time (wall time in parentheses); ratios are vs the full cache of the same prompt, CPU time.",
             "", "| prompt | tokens | depth | cache | prefill CPU s (wall) | decode CPU ms/tok (wall) | KV MiB "
             "| peak RSS GiB | prefill x | decode x | KV x | RSS x |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, entry in report["scenarios"].items():
        for run in entry["runs"]:
            ratio = run.get("vs_hf", {})
            lines.append(f"| {name} | {entry['prompt']['prompt_tokens']} | {entry['layers']}/{entry['vision_depth']} | "
                         f"{run['cache']} | "
                         f"{run['prefill_cpu_s']} ({run['prefill_wall_s']}) | "
                         f"{run['decode_cpu_ms_per_token']} ({run['decode_wall_ms_per_token']}) | "
                         f"{run['kv_bytes'] / 2**20:.1f} | {run['peak_rss_gib']} | "
                         + " | ".join(str(ratio.get(k, "")) for k in RATIOS) + " |")
    fit = report.get("fit")
    if fit:
        lines += ["", f"Full cache at 36 layers in {fit['ram_gib']:g} GiB ({fit['non_kv_gib_36_layers']} GiB of weights "
                  f"and runtime, {fit['kv_bytes_per_token_36_layers_measured']} KV bytes per token): at most "
                  f"{fit['full_cache_max_tokens_36_layers']} tokens of context "
                  f"({fit['full_cache_max_tokens_36_layers_one_shot_prefill']} with the one-shot prefill's activations, "
                  f"{fit['prefill_activation_bytes_per_token']} bytes per prompt token)"
                  + (f"; about {fit['full_cache_max_video_minutes_at_1fps']} min of 1-fps video at "
                     f"{fit['video_tokens_per_frame']} tokens/frame" if "video_tokens_per_frame" in fit else "")
                  + "." + (" Ours keeps " + ", ".join(f"{k}: {v['kv_bound_gib_36_layers']} GiB"
                                                       for k, v in fit["ours"].items())
                           + " of KV (36 layers) for any length." if fit["ours"] else "")]
    if report.get("media"):
        source = report.get("media_source", {})
        kept = " (kept from an earlier run, not rerun)" if source.get("kept_from_previous_run") else ""
        lines += ["", f"Real media sizes, ours M=128, {source.get('layers')} text layer(s) + "
                  f"{source.get('vision_depth')} vision block(s) at full width{kept}; wall seconds:", "",
                  "| media | vision tokens | grid (t, h, w) | prompt tokens | processor s | prefill s | KV entries (bound) "
                  "| evictions | peak RSS GiB |",
                  "|---|---:|---|---:|---:|---:|---|---:|---:|"]
        for name, entry in report["media"].items():
            p, run = entry["prompt"], entry["run"]
            grid = p.get("image_grid_thw", p.get("video_grid_thw"))
            grid = grid[0] if grid and len(grid) == 1 else grid
            prefill = run.get("prefill_wall_s", run.get("prefill_s"))
            lines.append(f"| {name} | {p.get('image', 0) + p.get('video', 0)} | {grid} | {p['prompt_tokens']} | "
                         f"{entry['processor_s']} | {prefill} | {run['kv_entries']} ({run['bound_entries']}) | "
                         f"{run['evictions']} | {run['peak_rss_gib']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
