"""Options of the kvpass backend: parsing and validation.

Every key a user can pass in ``torch.compile(..., backend="kvpass", options={...})`` is declared here;
anything else is rejected with a message that quotes the value and lists what is valid.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from kvpass.errors import OptionError
from kvpass.policies import POLICIES, Policy, make_policy
from kvpass.validate import check_int

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
    head_budgets: str = "uniform"     # "adaptive": a layer's heads share its slots (Ada-KV), packed store
    head_floor: float = 0.2           # adaptive: each head keeps at least this fraction of the per-head budget
    reserve: int = 0                  # slots past the budget that later forwards (questions, answers) fill first
    distribute: str | None = None     # "context": the KV is split over the ranks of torch.distributed's default group
    placement_block: int = 1          # distribute: tokens placed on the ranks in runs of this many
    placement: str = "most_free"      # distribute: a run goes to the rank with the most free slots, or "round_robin"
    rank_budgets: tuple[int, ...] | None = None  # distribute: each rank's slots (their sum is the budget), else equal
    offload: str | None = None        # "cpu" / "disk": what the store evicts goes to a lower tier, not dropped
    offload_dir: str | None = None    # offload "disk": the directory of the lower tier's (memory-mapped) files
    offload_attention: bool = False   # the lower tier's share of attention computed where it lives (InstInfer)

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
                "head_budgets": self.head_budgets,
                "head_floor": self.head_floor,
                "reserve": self.reserve,
                "distribute": self.distribute,
                "placement_block": self.placement_block,
                "placement": self.placement,
                "rank_budgets": self.rank_budgets,
                "offload": self.offload,
                "offload_attention": self.offload_attention,
            },
            sort_keys=True,
        )

    def budget_for(self, layer: int, n_layers: int, prompt_len: int) -> int:
        """KV slots kept by ``layer`` for a prompt of ``prompt_len`` tokens."""
        if self.layer_budgets is not None:
            if len(self.layer_budgets) != n_layers:
                raise OptionError(
                    f"kvpass: option 'layer_budgets' has {len(self.layer_budgets)} entries but the model "
                    f"has {n_layers} attention layers; give exactly one budget per layer"
                )
            return self.layer_budgets[layer]
        total = self.budget if self.budget is not None else max(1, math.ceil(self.ratio * prompt_len))
        # a ratio is a share of this prompt (PyramidKV's cap needs its length); a fixed budget serves every length
        return self.policy.layer_budget(total, layer, n_layers, prompt_len if self.ratio is not None else None)


_POLICY_KEYS = {"window", "sinks", "recent", "kernel_size", "pooling", "beta", "accumulate", "scores",
                "semantic_factor", "length_threshold", "sentence_ends"}
VALID_KEYS = ("policy", "budget", "ratio", "layer_budgets", "compiler", "fallback", "prefill_block", "episodes",
              "reference_kernels", "head_budgets", "head_floor", "reserve", "distribute", "placement_block",
              "placement", "rank_budgets", "offload", "offload_dir", "offload_attention", *sorted(_POLICY_KEYS))
DISTRIBUTE = ("context",)
PLACEMENTS = ("most_free", "round_robin")
OFFLOAD = ("cpu", "disk")
HEAD_BUDGETS = ("uniform", "adaptive")
# Policies whose per-slot scores are softmax weights of the slot's own kv head, comparable across heads (Ada-KV's
# premise). TOVA and StreamingLLM rank every head alike, and key norms are not comparable across heads.
ADAPTIVE_HEAD_POLICIES = ("epicache", "h2o", "pyramidkv", "snapkv")


def _positive_int(key: str, value: Any) -> int:
    return check_int(value, f"kvpass: option {key!r}", error=OptionError)


def parse_options(options: dict[str, Any] | None) -> KVPassOptions:
    """Validate a user's ``options`` dict into :class:`KVPassOptions`."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise OptionError(f"kvpass: options must be a dict, got {options!r}")
    unknown = sorted(set(options) - set(VALID_KEYS))
    if unknown:
        raise OptionError(f"kvpass: unknown option(s) {unknown!r}; valid options are {list(VALID_KEYS)}")
    name = options.get("policy", "snapkv")
    if not isinstance(name, str) or name not in POLICIES:
        raise OptionError(f"kvpass: unknown policy {name!r}; valid policies are {sorted(POLICIES)}")
    params = {k: options[k] for k in _POLICY_KEYS if k in options}
    policy = make_policy(name, **params)

    budget = _budget_of_ranks(options)
    ratio = options.get("ratio")
    layer_budgets = options.get("layer_budgets")
    given = [k for k, v in (("budget", budget), ("ratio", ratio), ("layer_budgets", layer_budgets)) if v is not None]
    if len(given) > 1:
        raise OptionError(f"kvpass: give only one of 'budget', 'ratio', 'layer_budgets'; got {given}")
    if not given:
        raise OptionError(
            "kvpass: no budget given; pass 'budget' (KV slots kept per layer, e.g. 1024), "
            "'ratio' (fraction of the prompt kept, in (0, 1]) or 'layer_budgets' (one int per layer)"
        )
    if budget is not None:
        budget = _positive_int("budget", budget)
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
            raise OptionError(f"kvpass: option 'ratio' must be a number in (0, 1] (fraction kept), got {ratio!r}")
        ratio = float(ratio)
    if layer_budgets is not None:
        if not isinstance(layer_budgets, list | tuple) or not layer_budgets:
            raise OptionError(f"kvpass: option 'layer_budgets' must be a non-empty list of ints, got {layer_budgets!r}")
        layer_budgets = tuple(_positive_int("layer_budgets", b) for b in layer_budgets)

    compiler = options.get("compiler", "inductor")
    if compiler not in COMPILERS:
        raise OptionError(f"kvpass: option 'compiler' must be one of {list(COMPILERS)}, got {compiler!r}")
    fallback = options.get("fallback", False)
    if not isinstance(fallback, bool):
        raise OptionError(f"kvpass: option 'fallback' must be True or False, got {fallback!r}")
    prefill_block = options.get("prefill_block")
    if prefill_block is not None:
        prefill_block = _positive_int("prefill_block", prefill_block)
        if ratio is not None:
            raise OptionError(
                f"kvpass: option 'prefill_block' ({prefill_block}) needs a fixed 'budget' or 'layer_budgets': a "
                f"'ratio' ({ratio}) of a prompt is unknown until the whole prompt has been read"
            )
    if getattr(policy, "needs_observation_prompt", False) and prefill_block is None:
        raise OptionError(
            f"kvpass: policy {name!r} scores the context block by block, by an observation prompt's attention over it "
            f"(option 'scores'={policy.scores!r}, EpiCache's rule); set 'prefill_block' (e.g. 512), or 'scores': "
            "'forward' to score a whole-prompt prefill by its own last 'window' queries")
    episodes = options.get("episodes")
    if episodes is not None:
        episodes = _positive_int("episodes", episodes)
        if policy.name != "epicache" or prefill_block is None:
            raise OptionError(
                f"kvpass: option 'episodes' ({episodes}) is EpiCache's: it needs policy 'epicache' and a "
                f"'prefill_block'; got policy {name!r} and prefill_block {prefill_block!r}"
            )
    reference_kernels = options.get("reference_kernels", False)
    if not isinstance(reference_kernels, bool):
        raise OptionError(f"kvpass: option 'reference_kernels' must be True or False (True runs the ops' pure-torch "
                         f"references instead of the Triton kernels, for debugging), got {reference_kernels!r}")
    head_budgets, head_floor = _head_options(options, policy)
    reserve = options.get("reserve", 0)
    if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0:
        raise OptionError(f"kvpass: option 'reserve' must be an int >= 0 (store slots past the budget that forwards "
                          f"after the prefill fill before anything is evicted), got {reserve!r}")
    distribute, placement_block, placement, rank_budgets = _distribute_options(options, head_budgets)
    if distribute is not None and getattr(policy, "needs_observation_prompt", False):
        raise OptionError(
            f"kvpass: policy {name!r} scores each block by an observation prompt's softmax over the context alone "
            f"(option 'scores'='context'), which option 'distribute' ({distribute!r}) does not normalize across ranks "
            "yet; use 'scores': 'forward' or a policy scored by the forward's own attention")
    offload, offload_dir, offload_attention = _offload_options(options, head_budgets, distribute, policy)
    if policy.name == "sentencekv":
        _check_sentencekv(policy, budget, offload, prefill_block, reserve)
    return KVPassOptions(policy, budget, ratio, layer_budgets, compiler, fallback, prefill_block, episodes,
                         reference_kernels, head_budgets, head_floor, reserve, distribute, placement_block,
                         placement, rank_budgets, offload, offload_dir, offload_attention)


def _offload_options(options: dict[str, Any], head_budgets: str, distribute: str | None,
                     policy: Policy) -> tuple[str | None, str | None, bool]:
    offload = options.get("offload")
    if offload is not None and offload not in OFFLOAD:
        raise OptionError(f"kvpass: option 'offload' must be one of {list(OFFLOAD)} (where the tokens a store evicts "
                         f"go: host memory, or memory-mapped files in 'offload_dir'), got {offload!r}")
    offload_dir = options.get("offload_dir")
    if offload == "disk":
        if not isinstance(offload_dir, str | os.PathLike) or not os.path.isdir(offload_dir):
            raise OptionError(f"kvpass: option 'offload'='disk' keeps the lower tier in files in 'offload_dir', which "
                             f"must be an existing directory; got offload_dir {offload_dir!r}")
        offload_dir = os.fspath(offload_dir)
    elif offload_dir is not None:
        raise OptionError(f"kvpass: option 'offload_dir' ({offload_dir!r}) is where a disk tier's files go; it needs "
                         f"'offload': 'disk', got offload {offload!r}")
    offload_attention = options.get("offload_attention", False)
    if not isinstance(offload_attention, bool):
        raise OptionError(f"kvpass: option 'offload_attention' must be True or False, got {offload_attention!r}")
    if offload_attention and offload is None:
        raise OptionError("kvpass: option 'offload_attention'=True computes the lower tier's share of attention where "
                         "it lives; it needs 'offload': 'cpu' or 'disk' (got no 'offload')")
    if offload is not None and not offload_attention and not getattr(policy, "retrieves", False):
        raise OptionError(
            f"kvpass: option 'offload'={offload!r} keeps what the store evicts in a lower tier; with policy "
            f"{policy.name!r} only attention computed in place reads it back: set 'offload_attention': True, or use "
            "policy 'sentencekv', which retrieves from it by sentence (LeoAM's chunk retrieval is not built yet)")
    if offload is not None:
        clashes = {"distribute": distribute, "head_budgets": head_budgets if head_budgets != "uniform" else None}
        given = {key: value for key, value in clashes.items() if value is not None}
        if given:
            raise OptionError(f"kvpass: option 'offload'={offload!r} does not combine with {given} yet; drop those "
                             "options (no distribute, head_budgets 'uniform')")
    return offload, offload_dir, offload_attention


def _check_sentencekv(policy: Policy, budget: int | None, offload: str | None, prefill_block: int | None,
                      reserve: int) -> None:
    """SentenceKV keeps what its device store evicts in a lower tier and retrieves from it by sentence."""
    if budget is None:
        raise OptionError("kvpass: policy 'sentencekv' attends a fixed 'budget' of tokens per step (sinks, recent, "
                          "retrieved); give 'budget', not 'ratio' or 'layer_budgets'")
    policy.retrieval_slots(budget)
    if offload is None:
        raise OptionError("kvpass: policy 'sentencekv' keeps the tokens it does not attend in a lower tier and "
                          "retrieves them by sentence; set 'offload': 'cpu' or 'disk'")
    if prefill_block is not None:
        raise OptionError(f"kvpass: policy 'sentencekv' compresses the whole prompt at once (SnapKV over its last "
                          f"'window' queries), as the reference does; drop 'prefill_block' (got {prefill_block!r})")
    if reserve:
        raise OptionError(f"kvpass: policy 'sentencekv' keeps exactly its sinks and recent window on the device (what "
                          f"it evicts stays retrievable in the lower tier); drop 'reserve' (got {reserve!r})")


def _budget_of_ranks(options: dict[str, Any]) -> Any:
    """Option 'budget', or the sum of 'rank_budgets' (which then gives it)."""
    budget, rank_budgets = options.get("budget"), options.get("rank_budgets")
    if rank_budgets is None:
        return budget
    if (not isinstance(rank_budgets, list | tuple) or not rank_budgets
            or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in rank_budgets)):
        raise OptionError(f"kvpass: option 'rank_budgets' must be a non-empty list of positive ints, one per rank (the "
                          f"slots each rank's store keeps of a layer), got {rank_budgets!r}")
    if options.get("ratio") is not None or options.get("layer_budgets") is not None:
        raise OptionError("kvpass: option 'rank_budgets' gives the context's budget (the sum of its entries); drop "
                          f"'ratio'/'layer_budgets' (got ratio {options.get('ratio')!r}, layer_budgets "
                          f"{options.get('layer_budgets')!r})")
    if budget is not None and budget != sum(rank_budgets):
        raise OptionError(f"kvpass: option 'budget' ({budget!r}) must be the sum of 'rank_budgets' ({rank_budgets!r}: "
                          f"{sum(rank_budgets)}), or be left out")
    return sum(rank_budgets)


def _distribute_options(options: dict[str, Any],
                        head_budgets: str) -> tuple[str | None, int, str, tuple[int, ...] | None]:
    distribute = options.get("distribute")
    if distribute is not None and distribute not in DISTRIBUTE:
        raise OptionError(f"kvpass: option 'distribute' must be one of {list(DISTRIBUTE)} (split each layer's KV "
                         f"over the ranks of torch.distributed's default group), got {distribute!r}")
    placed = {key: options[key] for key in ("placement_block", "placement", "rank_budgets")
              if options.get(key) is not None}
    if placed and distribute is None:
        raise OptionError(f"kvpass: options {placed} place tokens on ranks; they need 'distribute': 'context'")
    placement_block = options.get("placement_block")
    placement_block = 1 if placement_block is None else _positive_int("placement_block", placement_block)
    placement = options.get("placement") or "most_free"
    if placement not in PLACEMENTS:
        raise OptionError(f"kvpass: option 'placement' must be one of {list(PLACEMENTS)} (a run of placement_block "
                          f"tokens goes to the rank with the most free slots, or to the ranks in turn), got "
                          f"{placement!r}")
    rank_budgets = options.get("rank_budgets")
    rank_budgets = tuple(rank_budgets) if rank_budgets is not None else None
    if distribute is not None and head_budgets != "uniform":
        # a packed store keeps a layer's heads in one row; its slots are not placed by position yet
        raise OptionError(f"kvpass: option 'distribute'={distribute!r} splits each layer's store over ranks, which "
                         f"does not combine with head_budgets {head_budgets!r} yet; use head_budgets 'uniform'")
    return distribute, placement_block, placement, rank_budgets


def _head_options(options: dict[str, Any], policy: Policy) -> tuple[str, float]:
    # EpiCache's reference defaults to its "pair" level: one top-k over all of a layer's heads, no floor
    pair = policy.name == "epicache" and "head_budgets" not in options
    head_budgets = options.get("head_budgets", "adaptive" if pair else "uniform")
    if head_budgets not in HEAD_BUDGETS:
        raise OptionError(f"kvpass: option 'head_budgets' must be one of {list(HEAD_BUDGETS)}, got {head_budgets!r}")
    head_floor = options.get("head_floor")
    if head_floor is not None and head_budgets != "adaptive":
        raise OptionError(f"kvpass: option 'head_floor' ({head_floor!r}) applies to head_budgets 'adaptive' only; "
                         f"got head_budgets {head_budgets!r}")
    if head_floor is None:
        head_floor = 0.0 if pair else KVPassOptions.head_floor
    if isinstance(head_floor, bool) or not isinstance(head_floor, int | float) or not 0 <= head_floor <= 1:
        raise OptionError(f"kvpass: option 'head_floor' must be a number in [0, 1] (fraction of the per-head budget "
                         f"every head keeps), got {head_floor!r}")
    if head_budgets == "adaptive":
        if policy.name not in ADAPTIVE_HEAD_POLICIES:
            raise OptionError(
                f"kvpass: head_budgets 'adaptive' compares attention scores across heads; policy {policy.name!r} "
                f"does not score that way. Use one of {list(ADAPTIVE_HEAD_POLICIES)}")
        if policy.name == "epicache" and policy.kernel_size > 1:
            raise OptionError(
                f"kvpass: head_budgets 'adaptive' packs a layer's heads into one store, so slots are not in position "
                f"order and EpiCache's pooling (kernel_size {policy.kernel_size}) has no neighbours; use kernel_size 1")
    return head_budgets, float(head_floor)
