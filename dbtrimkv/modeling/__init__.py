"""How dbtrimkv plugs into a transformers model: the attention hook, the retention gates, the
model anatomy and the version compatibility shims, each the one holder of its knowledge."""
