"""Options of the kvpass backend: parsing and validation.

Every key a user can pass in ``torch.compile(..., backend="kvpass", options={...})`` is declared here;
anything else is rejected with a message that quotes the value and lists what is valid.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from kvpass.policies import POLICIES, Policy, make_policy

COMPILERS = ("inductor", "aot_eager", "eager")


@dataclasses.dataclass(frozen=True)
class KVPassOptions:
    """Validated backend options (see the README's "Options" table)."""

    policy: Policy
    budget: int | None = None
    ratio: float | None = None
    layer_budgets: tuple[int, ...] | None = None
    compiler: str = "inductor"
    fallback: bool = False
    prefill_block: int | None = None  # prefill the prompt in blocks of this many tokens
    episodes: int | None = None       # EpiCache: conversation episodes (caches) built by kvpass.EpisodicCache
    reference_kernels: bool = False   # run the ops' pure-torch references on every device (debugging)

    def uuid(self) -> str:
        """A key that changes whenever an option changes (for compile caches)."""
        return json.dumps(
            {
                "policy": self.policy.spec(),
                "budget": self.budget,
                "ratio": self.ratio,
                "layer_budgets": self.layer_budgets,
                "compiler": self.compiler,
                "prefill_block": self.prefill_block,
                "reference_kernels": self.reference_kernels,
            },
            sort_keys=True,
        )

    def budget_for(self, layer: int, n_layers: int, prompt_len: int) -> int:
        """KV slots kept by ``layer`` for a prompt of ``prompt_len`` tokens."""
        if self.layer_budgets is not None:
            if len(self.layer_budgets) != n_layers:
                raise ValueError(
                    f"kvpass: option 'layer_budgets' has {len(self.layer_budgets)} entries but the model "
                    f"has {n_layers} attention layers; give exactly one budget per layer"
                )
            return self.layer_budgets[layer]
        total = self.budget if self.budget is not None else max(1, math.ceil(self.ratio * prompt_len))
        return self.policy.layer_budget(total, layer, n_layers)


_POLICY_KEYS = {"window", "sinks", "recent", "kernel_size", "pooling", "beta", "accumulate"}
VALID_KEYS = ("policy", "budget", "ratio", "layer_budgets", "compiler", "fallback", "prefill_block", "episodes",
              "reference_kernels", *sorted(_POLICY_KEYS))


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value <= 0:
        raise ValueError(f"kvpass: option {key!r} must be a positive integer, got {value!r}")
    return int(value)


def parse_options(options: dict[str, Any] | None) -> KVPassOptions:
    """Validate a user's ``options`` dict into :class:`KVPassOptions`."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ValueError(f"kvpass: options must be a dict, got {options!r}")
    unknown = sorted(set(options) - set(VALID_KEYS))
    if unknown:
        raise ValueError(f"kvpass: unknown option(s) {unknown!r}; valid options are {list(VALID_KEYS)}")
    name = options.get("policy", "snapkv")
    if not isinstance(name, str) or name not in POLICIES:
        raise ValueError(f"kvpass: unknown policy {name!r}; valid policies are {sorted(POLICIES)}")
    params = {k: options[k] for k in _POLICY_KEYS if k in options}
    policy = make_policy(name, **params)

    budget = options.get("budget")
    ratio = options.get("ratio")
    layer_budgets = options.get("layer_budgets")
    given = [k for k in ("budget", "ratio", "layer_budgets") if options.get(k) is not None]
    if len(given) > 1:
        raise ValueError(f"kvpass: give only one of 'budget', 'ratio', 'layer_budgets'; got {given}")
    if not given:
        raise ValueError(
            "kvpass: no budget given; pass 'budget' (KV slots kept per layer, e.g. 1024), "
            "'ratio' (fraction of the prompt kept, in (0, 1]) or 'layer_budgets' (one int per layer)"
        )
    if budget is not None:
        budget = _positive_int("budget", budget)
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
            raise ValueError(f"kvpass: option 'ratio' must be a number in (0, 1] (fraction kept), got {ratio!r}")
        ratio = float(ratio)
    if layer_budgets is not None:
        if not isinstance(layer_budgets, list | tuple) or not layer_budgets:
            raise ValueError(f"kvpass: option 'layer_budgets' must be a non-empty list of ints, got {layer_budgets!r}")
        layer_budgets = tuple(_positive_int("layer_budgets", b) for b in layer_budgets)

    compiler = options.get("compiler", "inductor")
    if compiler not in COMPILERS:
        raise ValueError(f"kvpass: option 'compiler' must be one of {list(COMPILERS)}, got {compiler!r}")
    fallback = options.get("fallback", False)
    if not isinstance(fallback, bool):
        raise ValueError(f"kvpass: option 'fallback' must be True or False, got {fallback!r}")
    prefill_block = options.get("prefill_block")
    if prefill_block is not None:
        prefill_block = _positive_int("prefill_block", prefill_block)
        if ratio is not None:
            raise ValueError(
                f"kvpass: option 'prefill_block' ({prefill_block}) needs a fixed 'budget' or 'layer_budgets': a "
                f"'ratio' ({ratio}) of a prompt is unknown until the whole prompt has been read"
            )
    episodes = options.get("episodes")
    if episodes is not None:
        episodes = _positive_int("episodes", episodes)
        if policy.name != "epicache" or prefill_block is None:
            raise ValueError(
                f"kvpass: option 'episodes' ({episodes}) is EpiCache's: it needs policy 'epicache' and a "
                f"'prefill_block'; got policy {name!r} and prefill_block {prefill_block!r}"
            )
    reference_kernels = options.get("reference_kernels", False)
    if not isinstance(reference_kernels, bool):
        raise ValueError(f"kvpass: option 'reference_kernels' must be True or False (True runs the ops' pure-torch "
                         f"references instead of the Triton kernels, for debugging), got {reference_kernels!r}")
    return KVPassOptions(policy, budget, ratio, layer_budgets, compiler, fallback, prefill_block, episodes,
                         reference_kernels)
