"""skymoe: train, upcycle, scale out and serve Skywork-MoE style Mixture-of-Experts models."""

from .checkpoint import load_model, load_tokenizer, save_model
from .config import SkyworkMoeConfig
from .errors import CheckpointError, ConfigError, SkymoeError
from .model import SkyworkForCausalLM, build_model

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "SkymoeError", "SkyworkForCausalLM",
           "SkyworkMoeConfig", "build_model", "load_model", "load_tokenizer", "save_model"]
