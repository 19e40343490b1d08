"""KV-eviction policies, one file each; ``POLICIES`` maps option names to classes."""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

from kvpass.errors import OptionError
from kvpass.policies.base import Policy
from kvpass.policies.epicache import EpiCache
from kvpass.policies.h2o import H2O
from kvpass.policies.knorm import Knorm
from kvpass.policies.pyramidkv import PyramidKV
from kvpass.policies.sentencekv import SentenceKV, sentence_end_ids
from kvpass.policies.snapkv import SnapKV
from kvpass.policies.streaming_llm import StreamingLLM
from kvpass.policies.tova import TOVA

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (StreamingLLM, H2O, SnapKV, PyramidKV, TOVA, Knorm, EpiCache, SentenceKV)
}


def make_policy(name: str, **params: Any) -> Policy:
    """Build policy ``name`` with its options; a parameter the policy does not take is an error."""
    if name not in POLICIES:
        raise OptionError(f"kvpass: unknown policy {name!r}; valid policies are {sorted(POLICIES)}")
    cls = POLICIES[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in params.items():
        if key not in fields:
            raise OptionError(
                f"kvpass: policy {name!r} takes no option {key!r} (got {value!r}); "
                f"its options are {sorted(fields) or 'none'}"
            )
        if key in ("pooling", "scores", "semantic_factor", "sentence_ends"):  # the policy validates them
            continue
        if key == "accumulate":
            if not isinstance(value, bool):
                raise OptionError(
                    f"kvpass: option 'accumulate' of policy {name!r} must be True or False, got {value!r}")
            continue
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise OptionError(f"kvpass: option {key!r} of policy {name!r} must be an int >= 0, got {value!r}")
    return cls(**params)


@functools.lru_cache(maxsize=64)
def policy_from_spec(spec: str) -> Policy:
    fields = json.loads(spec)
    return make_policy(fields.pop("name"), **fields)


__all__ = ["POLICIES", "Policy", "make_policy", "policy_from_spec", "sentence_end_ids",
           *(c.__name__ for c in POLICIES.values())]
