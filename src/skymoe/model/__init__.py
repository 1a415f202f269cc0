"""The skymoe model: one PyTorch definition used by training, upcycling and inference."""

from .layers import KVCache
from .moe import MoEBlock, Routing, gating_logit_norm, route
from .transformer import CausalLMOutput, SkyworkForCausalLM, build_model

__all__ = ["CausalLMOutput", "KVCache", "MoEBlock", "Routing", "SkyworkForCausalLM",
           "build_model", "gating_logit_norm", "route"]
