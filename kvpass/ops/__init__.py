"""``kvpass::*`` custom ops, each with its schema, fake (meta) implementation and pure-torch reference together.

Importing this package registers every op: :mod:`kvpass.ops.kv` (the fixed-capacity KV store: extend, attend,
score, compact, and their head-packed forms) and :mod:`kvpass.ops.dllm` (Elastic-Cache's drift-tested attention).
"""

from kvpass.ops import dllm
from kvpass.ops.kv import (
    REFERENCES,
    attend_reference,
    compact_reference,
    pack_positions,
    score_reference,
    slot_heads,
    tokens_per_head,
)

__all__ = ["REFERENCES", "attend_reference", "compact_reference", "dllm", "pack_positions", "score_reference",
           "slot_heads", "tokens_per_head"]
