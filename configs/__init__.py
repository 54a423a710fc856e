"""YAML presets, installed as the data package `dbtrimkv.configs` (see `dbtrimkv.settings.presets`)."""
