"""Models and data kvpass is evaluated on: loaders for shipped pretrained models, benchmark generators.

This package never imports anything from the rest of kvpass.
"""

from .loaders import DEFAULT_MODEL, MODELS, load, load_config, load_tokenizer

__all__ = ["DEFAULT_MODEL", "MODELS", "load", "load_config", "load_tokenizer"]
