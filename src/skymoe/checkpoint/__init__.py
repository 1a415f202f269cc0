"""HF checkpoint directories: weights (safetensors / .bin shards), names, tokenizers."""

from .hf import load_model, save_model
from .tokenizer import StreamDecoder, Tokenizer, load_tokenizer, save_byte_tokenizer

__all__ = ["StreamDecoder", "Tokenizer", "load_model", "load_tokenizer", "save_byte_tokenizer",
           "save_model"]
