"""Serving: paged KV cache, continuous-batching engine, sampling, beam search, CLI; the HTTP server is infer.serve."""

from infer.engine import Engine, GenerationOutput
from infer.sampling import SamplingParams

__all__ = ["Engine", "GenerationOutput", "SamplingParams"]
