"""kvpass: KV-cache compression compiled into the model.

``torch.compile(model.forward, backend="kvpass", options={"policy": "snapkv", "budget": 1024})``
rewrites every attention layer of an unmodified Hugging Face decoder into a fixed-capacity KV store
that a policy evicts after each forward. See the README for options; :func:`explain` and
:func:`kv_stats` show what was done.
"""

from kvpass.analysis import UnsupportedGraph
from kvpass.config import KVPassOptions, parse_options
from kvpass.policies import POLICIES
from kvpass.report import explain, kv_stats

__version__ = "0.1.0"
__all__ = ["POLICIES", "KVPassOptions", "UnsupportedGraph", "explain", "kv_stats", "parse_options"]
