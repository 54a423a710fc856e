"""Gradio chat demo: talk to Qwen3-VL about images and videos inside a KV budget, and see what it kept.

Why: the budget is the product; this page makes it tangible. Each browser session owns a
`Conversation` (its bounded cache survives between turns); the side panel shows, after every
answer, KV memory used against a full cache, retained entries by modality and decode speed
(`GenerationStats`), the latest image tinted by how many (layer, KV head) entries of each patch
survive, a layer x head heatmap (`dbtrimkv.reporting.retention_maps`), and a retention timeline: every token in
order (video frames with their times) x layers, coloured by the KV heads still holding it
(`dbtrimkv.reporting.retention_timeline`), for image, video and text turns alike.

Safety defaults (see `launch`): loopback only unless told otherwise, no share link, bounded
upload size, bounded video length, a bounded queue that runs one generation at a time (sessions
share the model, whose generations the library serialises anyway; the queue shows waiting users
their place), no analytics. Files are taken only from the upload components, which Gradio confines
to its upload folder; no text field is ever opened as a path.

Launched by `dbtrimkv demo` (dbtrimkv/commands/demo.py), which loads this file from the checkout.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import gradio as gr
import torch

from dbtrimkv.settings.config import DBTrimKVConfig
from dbtrimkv.errors import DBTrimKVError
from dbtrimkv.settings.eviction_settings import resolve_eviction
from dbtrimkv.inputs.media import load_image, video_info
from dbtrimkv.modeling.model_anatomy import text_config_of
from dbtrimkv.pipeline import Conversation, DBTrimKVPipeline, GenerationStats
from dbtrimkv.reporting.stats_text import budget_words, format_bytes
from dbtrimkv.policies import policy_names
from dbtrimkv.reporting.retention_maps import head_heatmap, image_patch_survival, overlay
from dbtrimkv.reporting.retention_timeline import build as build_timeline, conversation_tokens, plot as plot_timeline

SESSION_SECONDS = 3600  # an idle session's cache is freed after this long
UPLOAD_CLEANUP = (3600, 3600)  # (every, older than) seconds: uploaded files are deleted from disk
EMPTY_PANEL = "Send a question to see what the cache keeps."


def session_config(base: DBTrimKVConfig, budget: float | None, memory_size: float | None, policy: str,
                   threshold: float | None) -> DBTrimKVConfig:
    """The eviction settings of the controls: memory size M > 0 wins (budget = L x H x M), else
    budget > 0, else no limit (full cache). Other settings (buffer, chunk, ...) come from `base`."""
    limit = {"memory_size": int(memory_size)} if memory_size else {"budget": int(budget)} if budget else {}
    return resolve_eviction(config=base, policy=policy, threshold=threshold if policy == "threshold" else None,
                            full_cache=not limit, **limit)


def user_message_of(exc: Exception, *uploads: str | None, unexpected: bool = False) -> str:
    """The error for the page: uploaded files named by their file name only, other absolute paths
    hidden, so the message shows nothing of the server's folders."""
    text = str(exc)
    for upload in uploads:
        if upload:
            text = text.replace(str(Path(upload).parent) + os.sep, "").replace(str(upload), Path(upload).name)
    text = re.sub(r"(?<![\w.])/(?:[\w.\-]+/)+([\w.\-]+)", r"\1", text)  # any other absolute path -> its name
    return f"Something went wrong with this request ({type(exc).__name__}: {text})" if unexpected else text


def check_video(path: str, max_seconds: float) -> None:
    """Refuse videos longer than `max_seconds` (or whose length cannot be read) before decoding them."""
    fps, frames = video_info(path)
    if frames <= 0:
        raise DBTrimKVError("Cannot tell how long this video is; upload a standard mp4/webm file")
    seconds = frames / fps
    if seconds > max_seconds:
        raise DBTrimKVError(f"This video is {seconds:.1f} s long; the demo accepts videos up to "
                            f"{max_seconds:g} s. Trim it and upload it again.")


class ChatSession:
    """One browser session: a conversation with a bounded cache, its settings, and its images."""

    def __init__(self, pipeline: DBTrimKVPipeline, config: DBTrimKVConfig):
        self.config = config
        session_pipeline = DBTrimKVPipeline(pipeline.model, pipeline.processor, config, pipeline.video)
        self.conversation = Conversation(session_pipeline)
        self.history: list[dict] = []  # what the chat shows (messages format)
        self.images: list = []  # PIL images in conversation order
        self.grids: list = []  # their (t, h, w) patch grids

    def send(self, text: str, image_path: str | None, video_path: str | None, max_new_tokens: int):
        """Start one streamed turn (the reply fills the last history message); returns the `StreamingOutput`."""
        images = [load_image(image_path)] if image_path else []
        videos = [video_path] if video_path else []
        stream = self.conversation.send(text, images=images, videos=videos, max_new_tokens=max_new_tokens,
                                        stream=True, progress=False)
        processor = self.conversation.pipeline.processor
        for image in images:  # the same grid the processor gave the prompt
            self.grids.append(processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0])
            self.images.append(image)
        media = [{"role": "user", "content": {"path": path}} for path in (image_path, video_path) if path]
        self.history += media + [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        return stream

    def retention_pictures(self):
        """(latest image with patch survival overlay or None, layer x head heatmap)."""
        cache = self.conversation.cache
        heatmap = head_heatmap(cache)
        if not self.images:
            return None, heatmap
        ids, mask = cache.known_tokens(1, "cpu")
        merge = self.conversation.pipeline.processor.image_processor.merge_size
        counts = image_patch_survival(cache, ids[0], mask[0], cache.image_token_id, torch.stack(self.grids),
                                      image_index=-1, merge_size=merge)
        return overlay(self.images[-1], counts, cache.segments_per_sequence), heatmap

    def retention_timeline(self):
        """Tokens in order x layers, coloured by the KV heads still holding each (video frames with their times)."""
        cache = self.conversation.cache
        tokenizer = self.conversation.pipeline.tokenizer
        timeline = build_timeline(cache, conversation_tokens(cache), tokenizer, cache.image_token_id,
                                  cache.video_token_id)
        return plot_timeline(timeline, title="what the cache holds, token by token")


def _bar(fraction: float, width: int = 24) -> str:
    filled = round(max(0.0, min(fraction, 1.0)) * width)
    return "█" * filled + "░" * (width - filled)


def stats_markdown(stats: GenerationStats) -> str:
    """The live panel: KV memory used vs a full cache, retained entries by modality, speed, and what the
    numbers mean (an entry, the bound and when eviction runs, storage allocated vs used)."""
    kept, prompt = stats.retained_entries, stats.prompt_tokens
    return "\n".join([
        "### KV memory",
        f"`{_bar(stats.kv_fraction)}` **{100 * stats.kv_fraction:.1f}%** of a full cache",
        f"{format_bytes(stats.kv_bytes)} used vs {format_bytes(stats.kv_bytes_full)} for a full cache "
        f"({stats.kv_entries:,} of {stats.kv_entries_full:,} entries; peak {stats.peak_kv_entries:,})",
        "",
        "### Retained entries by modality",
        "| | text | image | video |",
        "|---|---:|---:|---:|",
        f"| kept in cache | {kept['text']:,} | {kept['image']:,} | {kept['video']:,} |",
        f"| prompt tokens this turn | {prompt['text']:,} | {prompt['image']:,} | {prompt['video']:,} |",
        "",
        "### Speed",
        f"**{stats.tokens_per_second:.1f} tokens/s** ({stats.new_tokens} new tokens; prefill "
        f"{stats.prefill_seconds:.2f} s, decode {stats.decode_seconds:.2f} s)",
        "",
        f"policy **{stats.policy}**, {budget_words(stats.budget, stats.policy)}, evictions this turn {stats.evictions}",
        "",
        "### What the numbers mean",
        *(f"- {line}" for line in stats.explanation()),
    ])


def build_demo(pipeline: DBTrimKVPipeline, max_video_seconds: float = 60.0, max_new_tokens: int = 128,
               notice: str | None = None, examples: list[list] | None = None) -> gr.Blocks:
    """The Blocks app around a loaded pipeline; `pipeline.config` gives the controls' initial values.
    `examples`: (question, image path, video path) rows offered under the inputs."""
    text_config = text_config_of(pipeline.model)
    layers, heads = text_config.num_hidden_layers, text_config.num_key_value_heads
    base = pipeline.config

    def respond(text, image_path, video_path, budget, memory_size, policy, threshold, new_tokens, session):
        text = (text or "").strip()
        if not text:
            raise gr.Error("Type a question first.")
        try:
            if video_path:
                check_video(video_path, max_video_seconds)
            config = session_config(base, budget, memory_size, policy, threshold)
            if session is None or session.config != config:
                if session is not None:
                    gr.Info("The KV settings changed: a new conversation started with them.")
                session = ChatSession(pipeline, config)
            stream = session.send(text, image_path, video_path, int(new_tokens))
            yield "", None, None, session.history, session, *[gr.skip()] * 5
            for piece in stream:
                session.history[-1]["content"] += piece
                yield gr.skip(), gr.skip(), gr.skip(), session.history, *[gr.skip()] * 6
            stats = stream.stats
            image_map, heatmap = session.retention_pictures()
            timeline = session.retention_timeline()
        except DBTrimKVError as exc:
            raise gr.Error(user_message_of(exc, image_path, video_path)) from None
        except Exception as exc:  # noqa: BLE001 - the browser gets one line, never a server traceback or path
            raise gr.Error(user_message_of(exc, image_path, video_path, unexpected=True)) from None
        yield gr.skip(), gr.skip(), gr.skip(), session.history, session, stats_markdown(stats), image_map, \
            heatmap, stats.to_dict(), timeline

    def new_conversation():
        return None, [], EMPTY_PANEL, None, None, None, None

    with gr.Blocks(title="dbtrimkv: Qwen3-VL in a fixed KV budget", analytics_enabled=False,
                   delete_cache=UPLOAD_CLEANUP) as demo:
        gr.Markdown("## dbtrimkv — Qwen3-VL inside a fixed KV-cache budget\n"
                    "Ask about an image or a short video. Learned retention gates decide which cached "
                    "entries (one per token, layer and KV head) stay within the budget."
                    + (f"\n\n*{notice}*" if notice else ""))
        session = gr.State(None, time_to_live=SESSION_SECONDS)
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=360)
                question = gr.Textbox(label="Question", placeholder="What is in this image?", lines=2)
                with gr.Row():
                    image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"], height=150)
                    video = gr.Video(label=f"Video (at most {max_video_seconds:g} s)", sources=["upload"],
                                     include_audio=True, height=150)
                with gr.Row():
                    send = gr.Button("Send", variant="primary")
                    reset = gr.Button("New conversation")
                if examples:
                    gr.Examples(examples, inputs=[question, image, video], label="Examples (click one, then Send)")
            with gr.Column(scale=2):
                with gr.Accordion("KV budget (a change starts a new conversation)", open=True):
                    with gr.Row():
                        budget = gr.Number(label=f"Budget: entries over {layers} layers x {heads} KV heads "
                                                 "(0 = full cache)", value=base.budget or 0, minimum=0, precision=0)
                        memory = gr.Number(label="Memory size M per head (> 0 overrides: budget = layers x "
                                                 "heads x M)", value=base.memory_size or 0, minimum=0, precision=0)
                    with gr.Row():
                        policy = gr.Dropdown(policy_names(), value=base.policy,
                                             label="Policy (global = DBTrimKV, head = TrimKV)")
                        threshold = gr.Slider(0.001, 1.0, value=base.threshold or 0.01, step=0.001,
                                              label="Threshold tau (threshold policy)")
                    new_tokens = gr.Slider(1, max_new_tokens, value=min(64, max_new_tokens), step=1,
                                           label="Max new tokens")
                panel = gr.Markdown(EMPTY_PANEL)
                with gr.Row():
                    image_map = gr.Image(label=f"Image patches: (layer, head) entries kept, 0 purple ... "
                                               f"{layers * heads} yellow", type="pil", format="png",
                                         interactive=False, height=220)
                    heatmap = gr.Image(label="Entries kept per layer x KV head", type="pil", format="png",
                                       interactive=False, height=220)
                timeline = gr.Image(label="Retention timeline: tokens in order (video frames with their times) x "
                                          "layers, coloured by the KV heads still holding each", type="pil",
                                    format="png", interactive=False)
                with gr.Accordion("Raw stats (JSON)", open=False):
                    raw = gr.JSON(label="GenerationStats")

        gr.on([send.click, question.submit], respond,
              inputs=[question, image, video, budget, memory, policy, threshold, new_tokens, session],
              outputs=[question, image, video, chatbot, session, panel, image_map, heatmap, raw, timeline],
              api_name="chat")
        reset.click(new_conversation, outputs=[session, chatbot, panel, image_map, heatmap, raw, timeline],
                    api_name="new_conversation")
    return demo


SHARE_HINT = "* To create a public link, run `dbtrimkv demo --share`."


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           max_upload_mb: float = 50.0, queue_size: int = 16, prevent_thread_lock: bool = False,
           share_hint: str | None = SHARE_HINT):
    """Serve with the safety defaults of the module docstring; returns Gradio's `(app, local_url, share_url)`.

    Gradio's own start-up lines are silenced (they tell the user to "set `share=True` in `launch()`", which
    a command-line user cannot do); this prints the local URL and, without `share`, `share_hint` instead.
    The public URL and share-link failures are still printed by Gradio."""
    demo.queue(default_concurrency_limit=1, max_size=queue_size)
    result = demo.launch(server_name=host, server_port=port, share=share, max_file_size=int(max_upload_mb * 2**20),
                         allowed_paths=[], show_error=True, ssr_mode=False, mcp_server=False,
                         prevent_thread_lock=True, quiet=True)
    print(f"* Running on local URL:  {demo.local_url}", flush=True)
    if not share and share_hint:
        print(share_hint, flush=True)
    if not prevent_thread_lock:
        demo.block_thread()
    return result
