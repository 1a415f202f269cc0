"""HF checkpoint directories: weights (safetensors / .bin shards), names, tokenizers."""

from .hf import load_model, save_model
from .tokenizer import TextStream, Tokenizer, load_tokenizer, save_byte_tokenizer

__all__ = ["TextStream", "Tokenizer", "load_model", "load_tokenizer", "save_byte_tokenizer",
           "save_model"]
