"""The settings a user chooses: the gate config, the eviction settings, the presets and the limits."""
