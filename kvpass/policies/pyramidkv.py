"""PyramidKV: SnapKV scoring with layer budgets that shrink with depth.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
2024 (arXiv:2406.02069). Lower layers attend broadly and keep more. The budgets follow kvpress's
``PyramidKVPress.get_layer_budget`` (NVIDIA/kvpress, ``kvpress/presses/pyramidkv_press.py``, itself after
KVCache-Factory's ``pyramidkv_utils.py``) exactly, with ``avg`` the requested mean budget per layer:

* the budgets fall linearly (``round``) from ``largest = 2·avg − avg/beta`` at the first layer to
  ``smallest = avg/beta`` at the last, so their mean is ``avg``;
* the cap: if ``largest >= prompt − window``, then ``largest = prompt − window`` and ``smallest = 2·avg − largest``;
* the fallback: unless ``prompt >= largest >= smallest >= window``, every layer keeps ``avg`` — uniform SnapKV.
  With the defaults (``window`` 64, ``beta`` 20) that is every ``avg`` below 1280 on a long prompt, so a layer's
  budget never falls below the protected window.

The cap needs the prompt's length, which kvpass knows where the budget is a share of it (option ``ratio``, kvpress's
``1 − compression_ratio``: exact). With a fixed ``budget`` the store is sized before any prompt is seen (one compiled
model serves every prompt length), so the budgets are those of a long prompt: the cap, which binds only on prompts
shorter than ``2·avg − avg/beta + window``, is not applied (a departure, on short prompts only). One attention layer
keeps ``avg`` (kvpress would divide by zero).
"""

from __future__ import annotations

import dataclasses
import math

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

    def layer_budget(self, total: int, layer: int, n_layers: int, prompt_len: int | None = None) -> int:
        prompt = math.inf if prompt_len is None else prompt_len
        smallest = total / self.beta
        largest = 2 * total - smallest
        if largest >= prompt - self.window:  # the cap
            largest = prompt - self.window
            smallest = 2 * total - largest
        if n_layers == 1 or not prompt >= largest >= smallest >= self.window:  # the fallback: uniform SnapKV
            return total
        return round(largest - layer * (largest - smallest) / (n_layers - 1))
