"""Turning a name into a model: checkpoints, model resolution, tiny offline models and real shapes."""
