"""`dbtrimkv demo`: serve the Gradio chat demo (demos/gradio_demo.py) with safe defaults.

Why: one command shows the product: upload an image or a short video, chat, change the budget,
and watch memory, retained entries and retention maps. The app lives in `demos/`, installed as
the subpackage `dbtrimkv.demos`.
"""

from __future__ import annotations

import importlib
import sys

from . import arguments
from .common import TINY_NOTICE, add_eviction_args, add_model_args, add_progress_arg, eviction_config, show_progress
from .lazy import lazy

checkpoints = lazy("dbtrimkv.loading.checkpoints")
pipeline = lazy("dbtrimkv.pipeline")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="serve the Gradio chat demo with retention maps",
        description="Serve a Gradio chat demo: upload an image or a short video, ask questions over several "
                    "turns, change the KV budget / memory size / policy, and see KV memory used against a full "
                    "cache, retained entries by modality, decode speed, which image patches survive in how many "
                    "(layer, KV head) pairs, and a layer x head heatmap. Serves on 127.0.0.1 only unless --host "
                    "says otherwise; no public share link unless --share. One generation runs at a time; other "
                    "requests wait in a bounded queue.")
    add_model_args(p)
    add_eviction_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 exposes the demo "
                        "to the network)")
    g.add_argument("--port", type=arguments.port, default=7860, help="port to listen on, 1-65535 (default: 7860)")
    g.add_argument("--share", action="store_true",
                   help="also open a public *.gradio.live link through Gradio's relay (off by default)")
    g.add_argument("--max-upload-mb", type=arguments.positive_float, default=50.0,
                   help="largest accepted upload in MiB; bigger files are refused (default: 50)")
    g.add_argument("--max-video-seconds", type=arguments.positive_float, default=60.0,
                   help="longer videos are refused with a message in the page (default: 60)")
    g.add_argument("--queue-size", type=arguments.positive_int, default=16,
                   help="requests that may wait for the model; more are turned away (default: 16)")
    g.add_argument("--max-new-tokens", type=arguments.new_tokens, default=256,
                   help="upper end of the page's 'max new tokens' slider (default: 256)")
    add_progress_arg(p)
    p.set_defaults(func=run)


def load_demo_module():
    """The Gradio app (`demos/gradio_demo.py`, installed as `dbtrimkv.demos.gradio_demo`)."""
    return importlib.import_module("dbtrimkv.demos.gradio_demo")


def run(args) -> int:
    arguments.check_port_free(args.host, args.port)
    show_progress(args)  # the model download's bars
    demo_module = load_demo_module()
    notice = TINY_NOTICE if args.model is None else None
    if notice:
        print(notice, file=sys.stderr)
    model, processor = checkpoints.load_model(args.model, device=args.device, dtype=args.dtype)
    pipe = pipeline.DBTrimKVPipeline(model, processor, eviction_config(args, model))
    examples = importlib.import_module("dbtrimkv.demos.examples").example_rows() if args.model is None else None
    demo = demo_module.build_demo(pipe, max_video_seconds=args.max_video_seconds,
                                  max_new_tokens=args.max_new_tokens, notice=notice, examples=examples)
    demo_module.launch(demo, host=args.host, port=args.port, share=args.share, max_upload_mb=args.max_upload_mb,
                       queue_size=args.queue_size)
    return 0
