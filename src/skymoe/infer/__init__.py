"""Inference: sampling and KV-cached generation."""

from .generate import SamplingParams, generate, sample_next

__all__ = ["SamplingParams", "generate", "sample_next"]
