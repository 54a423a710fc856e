"""The entry point lmms-eval reads to find the `dbtrimkv` model (group `lmms_eval.models`).

Why: lmms-eval loads external models from the `lmms_eval.models` entry-point group (a
`ModelManifest` naming the class by path), so `pip install -e ".[lmms]"` is all it takes: no fork,
no plugin environment variable. The class itself is imported only when a run asks for it.
"""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest

MODEL_ID = "dbtrimkv"
MANIFEST = ModelManifest(model_id=MODEL_ID, chat_class_path="dbtrimkv.lmms.model.DBTrimKVLMM")
