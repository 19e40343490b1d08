"""``kvpass::*`` custom ops, each with its schema, fake (meta) implementation and pure-torch reference together.

Importing this package registers every op: :mod:`kvpass.ops.kv` (the fixed-capacity KV store: extend, attend,
score, compact, and their head-packed forms), :mod:`kvpass.ops.observe` (EpiCache's scores of an observation prompt
over the context), :mod:`kvpass.ops.dllm` (Elastic-Cache's drift-tested attention),
:mod:`kvpass.ops.partial` (attention over one part of a split store and the exact log-sum-exp merge of the parts:
tiered stores, KV across ranks, shared prefixes) and :mod:`kvpass.ops.tier` (a tiered store's evicted slots, and
attention computed where its lower tier lives).
"""

import torch

from kvpass.ops import dllm, observe, partial, tier
from kvpass.ops.kv import REFERENCES as _KV_REFERENCES
from kvpass.ops.kv import (
    attend_reference,
    compact_reference,
    pack_positions,
    score_reference,
    slot_heads,
    tokens_per_head,
)
from kvpass.ops.partial import PARTIAL_REFERENCES, attend_part_reference, merge_parts_reference, merge_two
from kvpass.ops.tier import TIER_REFERENCES

# op overload -> its pure-torch reference, for the ops the eviction passes insert (inlined by the lowerings)
REFERENCES = {**_KV_REFERENCES, torch.ops.kvpass.context_scores.default: observe.context_scores_reference,
              **PARTIAL_REFERENCES, **TIER_REFERENCES}

__all__ = ["PARTIAL_REFERENCES", "REFERENCES", "attend_part_reference", "attend_reference", "compact_reference", "dllm",
           "merge_parts_reference", "merge_two", "observe", "pack_positions", "partial", "score_reference",
           "slot_heads", "tier", "tokens_per_head"]
