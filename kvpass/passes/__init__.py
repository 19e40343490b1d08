"""Graph passes, one class per file."""

from kvpass.passes.insert_kv_eviction import InsertKVEviction, LayerPlan

__all__ = ["InsertKVEviction", "LayerPlan"]
