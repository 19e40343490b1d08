"""Graph passes, one class per file."""

from kvpass.passes.blockwise_prefill import BlockInputs, BlockwisePrefill
from kvpass.passes.insert_kv_eviction import InsertKVEviction, LayerPlan

__all__ = ["BlockInputs", "BlockwisePrefill", "InsertKVEviction", "LayerPlan"]
