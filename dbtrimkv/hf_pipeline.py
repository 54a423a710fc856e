"""`transformers.pipeline("dbtrimkv-image-text-to-text", model=...)`.

Why: users of transformers' pipelines (and tools built on them) expect to reach a feature through
the task registry, as kvpress does for its presses. This registers a thin transformers `Pipeline`
that delegates to `DBTrimKVPipeline`. A model passed by name is loaded by transformers (fresh,
untrained gates are attached, with a warning); for released TrimKV / DBTrimKV checkpoints pass the
model and processor from `dbtrimkv.load_model(...)`.
"""

from __future__ import annotations

import warnings

from transformers import AutoModelForImageTextToText, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .errors import ConfigError
from .loading.checkpoints import UNTRAINED_WARNING
from .settings.config import DBTrimKVConfig
from .modeling.gates import attach_retention_gates, gate_spec_of
from .pipeline import DBTrimKVPipeline

TASK = "dbtrimkv-image-text-to-text"


class DBTrimKVImageTextToTextPipeline(Pipeline):
    """Chat messages in; out, as transformers' image-text-to-text pipeline returns: for one chat a list with
    one `{"input_text", "generated_text", "stats"}` dict (the answer alone, as with `return_full_text=False`),
    for a list of chats a list of such lists. See `DBTrimKVPipeline`."""
    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args, eviction: DBTrimKVConfig | str | None = None, **kwargs):
        super().__init__(*args, **kwargs)

        if gate_spec_of(self.model) is None:
            warnings.warn(f"{UNTRAINED_WARNING}; pass a model from dbtrimkv.load_model for learned eviction",
                          stacklevel=2)
            attach_retention_gates(self.model)
        config = DBTrimKVConfig.load(eviction) if isinstance(eviction, str) else eviction
        self.dbtrimkv = DBTrimKVPipeline(self.model, self.processor or self.tokenizer, config)

    def _sanitize_parameters(self, **kwargs):
        return {}, kwargs, {}

    def __call__(self, messages, **kwargs):
        """`messages`: one chat (list of message dicts or a string) or a list of chats."""
        if kwargs.get("stream"):
            raise ConfigError("the transformers pipeline task returns whole answers; for a streamed answer call "
                              "its DBTrimKVPipeline, `pipe.dbtrimkv(messages, stream=True)`")
        single = isinstance(messages, str) or (isinstance(messages, list) and messages and isinstance(messages[0], dict))
        chats = [messages] if single else messages
        results = self.postprocess(self._forward(messages, **kwargs), inputs=chats)
        return results[0] if single else results

    def preprocess(self, inputs, **kwargs):
        return inputs

    def _forward(self, model_inputs, **kwargs):
        out = self.dbtrimkv(model_inputs, **kwargs)
        return out if isinstance(out, list) else [out]

    def postprocess(self, model_outputs, inputs=None, **kwargs):
        """One list of one result dict per chat (transformers returns one dict per generated sequence)."""
        inputs = inputs if inputs is not None else [None] * len(model_outputs)
        return [[{"input_text": chat, "generated_text": o.text, "stats": o.stats.to_dict()}]
                for chat, o in zip(inputs, model_outputs)]


def register() -> None:
    if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=DBTrimKVImageTextToTextPipeline,
                                            pt_model=AutoModelForImageTextToText, type="multimodal")
