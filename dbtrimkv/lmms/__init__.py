"""dbtrimkv inside lmms-eval: the `dbtrimkv` model, its cost records and the offline recall task.

Why: the field compares multimodal models and KV methods with lmms-eval. `registration` and
`model` (and `python -m dbtrimkv.lmms`) need the optional extra (`pip install -e ".[lmms]"`);
`settings`, `messages`, `cost` and `recall_export` do not, so `dbtrimkv eval export-lmms` and the
main tests run without it.
See README, "Evaluating with lmms-eval".
"""
