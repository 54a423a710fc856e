"""The server's sampling settings and sampler are the model runner's (`dbtrimkv.runner.sampling`, their
one owner); this is the name the HTTP layer and the engine import them by."""

from ..runner.sampling import SEED_RANGE, InvalidSampling, Sampler, SamplingParams

__all__ = ["SEED_RANGE", "InvalidSampling", "Sampler", "SamplingParams"]
