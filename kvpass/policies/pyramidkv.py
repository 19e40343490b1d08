"""PyramidKV: SnapKV scoring with layer budgets that shrink with depth.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
2024 (arXiv:2406.02069). Lower layers attend broadly and keep more; budgets fall linearly from
``2·avg − avg/beta`` at the first layer to ``avg/beta`` at the last, so their mean is the requested
per-layer budget.
"""

from __future__ import annotations

import dataclasses

from kvpass.errors import OptionError
from kvpass.policies.snapkv import SnapKV


@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
    beta: int = 20
    name = "pyramidkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1:
            raise OptionError(f"kvpass: option 'beta' must be >= 1, got {self.beta!r}")

    def layer_budget(self, total: int, layer: int, n_layers: int) -> int:
        if n_layers == 1:
            return total
        low = total / self.beta
        high = 2 * total - low
        return max(1, round(high - layer * (high - low) / (n_layers - 1)))
