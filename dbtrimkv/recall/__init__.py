"""The synthetic recall task and the tiny model trained on it.

Why: the evaluation harness (`dbtrimkv.eval`) measures eviction policies; what it measures them on
lives here: the task generator (`tasks`), the tiny Qwen3-VL's architecture and location
(`recall_model`), and the two trainers behind the shipped `tiny-recall` (`train_model` trains the
model from scratch, `train_gates` trains its retention gates).
"""
