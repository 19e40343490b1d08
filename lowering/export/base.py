"""What every export format declares, and the greedy generation loop shared by every loader."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from kvpass.validate import check_int

MANIFEST = "kvpass_export.json"


class Runner(Protocol):
    """A loaded artifact's two programs (see :mod:`kvpass.lowering.export.programs` for the convention)."""

    def prefill(self, ids: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, Any]:
        """``ids``/``positions`` int64 ``[1, T]`` → (last-token logits ``[V]``, opaque state)."""

    def decode(self, ids: np.ndarray, positions: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        """One token ``[1, 1]`` → (its logits ``[V]``, the next state)."""

    def prefill_block(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray, observe: np.ndarray,
                      state: Any) -> tuple[np.ndarray, Any]:
        """One block ``[1, C]`` (artifacts exported with ``prefill_block``) → (last-token logits ``[V]``, the next
        state). ``state`` is the runner's own from the previous block, or torch tensors for the first one."""


@dataclasses.dataclass(frozen=True)
class ExportFormat:
    """One ``--format``: what it needs and supports, how to write it and (if it runs here) load it."""

    name: str
    description: str
    requires: tuple[str, ...]        # Python modules the exporter (and loader) import
    install: str                     # how to get them
    dynamic_prompt: bool             # the prefill takes any prompt length (else: exactly --prompt-len)
    keeps_kvpass_ops: bool           # the artifact calls kvpass::* ops (else: decomposed into ATen)
    runnable: bool                   # kvpass.load can run it
    prefill_block: bool              # exports --prefill-block C: a static block program, any prompt length
    write: Callable[..., list[str]]  # (programs, out_dir, progress) -> files written, relative to out_dir
    load: Callable[[Path, dict], Runner] | None = None

    def missing(self) -> list[str]:
        return [m for m in self.requires if importlib.util.find_spec(m) is None]


class Progress:
    """Step-by-step progress on stderr (tqdm); silent when disabled."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, disable=not enabled, desc="kvpass export", unit="step",
                        bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}] {postfix}")

    def start(self, what: str) -> None:
        self.bar.set_postfix_str(what)

    def done(self) -> None:
        self.bar.update(1)

    def add(self, steps: int) -> None:
        self.bar.total += steps
        self.bar.refresh()

    def close(self, ok: bool = True) -> None:
        """Close the bar; after a failure (``ok`` False) a terminal keeps only the error, not the bar."""
        self.bar.leave = ok
        self.bar.close()


class ExportedModel:
    """A loaded artifact: greedy generation with the compressed KV store, no model code needed."""

    def __init__(self, manifest: dict[str, Any], runner: Runner) -> None:
        self.manifest = manifest
        self.runner = runner

    def __repr__(self) -> str:
        m = self.manifest
        return (f"ExportedModel(format={m['format']!r}, model_type={m['model_type']!r}, policy={m['policy']}, "
                f"budgets={m['budgets']})")

    def generate(self, input_ids: Sequence[int] | Any, max_new_tokens: int, stop_at_eos: bool = False) -> list[int]:
        """Greedy continuation (new token ids only) of one prompt (a list of ids, ``[T]`` or ``[1, T]``)."""
        ids = np.asarray(input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids, dtype=np.int64)
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.ndim != 1:
            raise ValueError(f"kvpass: generate takes one prompt ([T] or [1, T] token ids), got shape {ids.shape}")
        max_new_tokens = check_int(max_new_tokens, "kvpass: max_new_tokens")
        m = self.manifest
        t = len(ids)
        block = m.get("prefill_block")
        if m["prompt_len"] is not None and t != m["prompt_len"]:
            raise ValueError(f"kvpass: this {m['format']} artifact was exported for prompts of exactly "
                             f"{m['prompt_len']} tokens (--prompt-len), got {t}")
        shortest = 1 if block else 2
        if m["prompt_len"] is None and not shortest <= t <= m["max_prompt"]:
            raise ValueError(f"kvpass: prompt of {t} tokens; this artifact takes {shortest}..{m['max_prompt']} tokens")
        if block:
            logits, state = self._prefill_blocks(ids, block)
        else:
            logits, state = self.runner.prefill(ids[None], np.arange(t, dtype=np.int64)[None])
        out: list[int] = []
        eos = set(m["eos_token_id"]) if stop_at_eos else set()
        for step in range(max_new_tokens):
            token = int(np.argmax(logits))
            out.append(token)
            if token in eos or step == max_new_tokens - 1:
                break
            logits, state = self.runner.decode(np.array([[token]], dtype=np.int64),
                                               np.array([[t + step]], dtype=np.int64), state)
        return out


    def _prefill_blocks(self, ids: np.ndarray, block: int) -> tuple[np.ndarray, Any]:
        """Prefill ``ids`` by calling the block program once per block (as kvpass's ``BlockwiseRunner`` does)."""
        import torch
        from kvpass.lowering.export.programs import empty_state, split_prompt

        m = self.manifest
        t = len(ids)
        n_blocks, pad = split_prompt(t, block)
        front = np.zeros(pad, dtype=np.int64)
        ids = np.concatenate([front, ids])[None]  # padding: token 0 at position 0, marked not valid
        positions = np.concatenate([front, np.arange(t, dtype=np.int64)])[None]
        valid = np.concatenate([np.zeros(pad, dtype=bool), np.ones(t, dtype=bool)])[None]
        observe = np.zeros((1, block), dtype=bool)  # no observation-only tokens
        state: Any = empty_state(m["capacities"], m["kv_heads"], m["head_dim"], getattr(torch, m["kv_dtype"]))
        logits = None
        for i in range(n_blocks):
            part = slice(i * block, (i + 1) * block)
            logits, state = self.runner.prefill_block(*(np.ascontiguousarray(a[:, part]) for a in
                                                        (ids, positions, valid)), observe, state)
        return logits, state


def read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.is_file():
        raise ValueError(f"kvpass: {str(path)!r} is not a kvpass export (no {MANIFEST} in it); "
                         "create one with `kvpass export` / kvpass.export(...)")
    return json.loads(file.read_text())
