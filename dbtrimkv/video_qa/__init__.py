"""Long-video question answering inside a fixed KV budget.

Why: an hour of video must not need more KV memory than a minute. `streaming` decodes a video
window by window and prefills it through one bounded `DBTrimKVCache` (fixed per-frame size,
absolute timestamps), then forks the compressed cache per question; `datasets` reads Video-MME,
MLVU and plain JSONL annotations; `answers` parses option letters out of generated text; `runner`
answers a whole dataset resumably, one encoding per video. The CLI is `dbtrimkv video-qa`.
"""

from .answers import parse_choice
from .datasets import FORMATS, DatasetError, QAItem, load_dataset
from .runner import accuracy, load_predictions, run_dataset
from .streaming import (
    EncodedVideo,
    StreamOptions,
    VideoAnswer,
    VideoQA,
    ask,
    encode_video,
    frame_size,
    prompt_parts,
    text_inputs,
    video_windows,
)

__all__ = [
    "FORMATS", "DatasetError", "EncodedVideo", "QAItem", "StreamOptions", "VideoAnswer", "VideoQA", "accuracy",
    "ask", "encode_video", "frame_size", "load_dataset", "load_predictions", "parse_choice", "prompt_parts",
    "run_dataset", "text_inputs", "video_windows",
]
