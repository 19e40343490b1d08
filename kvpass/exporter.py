"""The export pipeline: torch.export a Hugging Face decoder, rewrite it with kvpass, hand it to a format writer.

``kvpass.export(model, out, format=..., policy=..., budget=...)`` torch.exports the model's prefill (or, with
``prefill_block=C``, the block-wise prefill's block program) and decode step with the KV cache as explicit inputs,
rewrites both with kvpass's attention analysis and passes (the same rewrite the ``kvpass`` backend applies), and
packages them in one of :data:`kvpass.lowering.export.FORMATS`. The formats, the programs' calling convention and
the loaders live in :mod:`kvpass.lowering.export`, which knows nothing of the analysis or the passes.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch.export import Dim, ExportedProgram

import kvpass.ops  # noqa: F401  (registers the kvpass::* ops the programs call)
from kvpass.analysis import find_attention_sites
from kvpass.config import KVPassOptions, parse_options
from kvpass.lowering.export import FORMATS, get_format
from kvpass.lowering.export.base import MANIFEST, Progress
from kvpass.lowering.export.programs import MANIFEST_VERSION, Programs, empty_state
from kvpass.passes import InsertKVEviction, LayerPlan
from kvpass.passes.block_graph import rewrite_blocks
from kvpass.validate import check_int

__all__ = ["export", "export_programs", "resolve_model"]


class _ExplicitCacheForward(torch.nn.Module):
    """``model.forward`` with the KV cache as flat tensor inputs/outputs (last-token logits only)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if past:
            for layer, k, v in zip(cache.layers, past[0::2], past[1::2], strict=True):
                # the store is the layer's whole cache: the model's update is cat([store, new])
                layer.keys, layer.values = k, v
                layer.dtype, layer.device, layer.is_initialized = k.dtype, k.device, True
        out = self.model(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=True,
                         logits_to_keep=1)
        return (out.logits, *[t for layer in cache.layers for t in (layer.keys, layer.values)])


def _plain_graph(ep: ExportedProgram) -> tuple[torch.nn.Module, fx.Graph]:
    """The unlifted module of an exported forward and a copy of its graph with plain (flat-args) codegen."""
    module = ep.module()
    graph = fx.Graph()
    graph.output(graph.graph_copy(module.graph, {}))  # plain codegen: flat positional inputs and outputs
    for node in list(graph.nodes):  # the unlifted module's input guard: re-export checks shapes itself
        if node.op == "call_module" and "guards" in str(node.target) and not node.users:
            graph.erase_node(node)
    return module, graph


def _rewrite(ep: ExportedProgram, options: KVPassOptions) -> tuple[fx.GraphModule, list[LayerPlan], dict[str, int]]:
    """Run kvpass's analysis and rewrite on an exported forward; returns a plain (flat-args) GraphModule."""
    module, graph = _plain_graph(ep)
    sites = find_attention_sites(graph)
    rewrite = InsertKVEviction(options)
    plans = rewrite(graph, sites)
    graph.eliminate_dead_code()
    return fx.GraphModule(module, graph), plans, dict(rewrite.counters)


def _rewrite_blocks(ep: ExportedProgram, options: KVPassOptions) -> tuple[fx.GraphModule, list[LayerPlan],
                                                                            dict[str, int]]:
    """Rewrite an exported dynamic-length prefill into the block graph, as the backend's block-wise path does
    (:func:`kvpass.passes.block_graph.rewrite_blocks`). The graph takes
    ``(ids, positions, k_0, v_0, ..., valid, observe, pos_0, acc_0, seen_0, ...)``."""
    module, graph = _plain_graph(ep)
    rewritten = rewrite_blocks(graph, find_attention_sites(graph), options)
    layout = rewritten.layout
    roles = [(tok.index, tok.dim, tok.role) for tok in layout.tokens]
    if roles != [(0, 1, "input_ids"), (1, 1, "position_ids")] or layout.seq_inputs or layout.token_outputs:
        raise RuntimeError(f"kvpass export: unexpected block graph layout (token inputs {roles}, length inputs "
                           f"{layout.seq_inputs}, per-token outputs {sorted(layout.token_outputs)})")
    graph.eliminate_dead_code()
    return fx.GraphModule(module, graph), rewritten.plans, rewritten.counters


class _FlatCall(torch.nn.Module):
    """Re-exportable wrapper: the rewritten graph's outputs regrouped as ``(logits, *state)``."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args: torch.Tensor):
        outs = self.gm(*args)
        # gm returns (logits, k_0, v_0, ..., state of layer 0, 1, ...): already in the documented order
        return tuple(outs)


class _BlockCall(torch.nn.Module):
    """Re-exportable block program: ``(ids, positions, valid, observe, *state)`` in the documented order."""

    def __init__(self, gm: fx.GraphModule, n_layers: int) -> None:
        super().__init__()
        self.gm = gm
        self.n_stores = 2 * n_layers

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor,
                observe: torch.Tensor, *state: torch.Tensor):
        stores, meta = state[: self.n_stores], state[self.n_stores :]
        return tuple(self.gm(input_ids, position_ids, *stores, valid, observe, *meta))


def _check_decode_inputs(gm: fx.GraphModule, n_layers: int) -> None:
    """The decode graph takes ids, positions, the stores, then (added by the pass) the metadata."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    expected = 2 + 2 * n_layers + 3 * n_layers
    if len(names) != expected:
        raise RuntimeError(f"kvpass export: decode graph has {len(names)} inputs, expected {expected}: {names}")


def export_programs(model: torch.nn.Module, options: KVPassOptions, *, prompt_len: int | None = None,
                    max_prompt: int | None = None, prefill_block: int | None = None) -> Programs:
    """torch.export the prefill and decode step of ``model`` (batch 1) and rewrite both with kvpass.

    ``prompt_len``: export the prefill for exactly that many tokens (formats without dynamic shapes);
    ``None`` exports a dynamic prompt length (2 .. ``max_prompt``, default the model's
    ``max_position_embeddings``). ``prefill_block``: export the block program instead (static shapes,
    that many tokens per call; a loader loops it over a prompt of any length up to ``max_prompt``).
    The programs keep the ``kvpass::*`` ops (:func:`kvpass.lowering.export.programs.decompose` removes them).
    """
    cfg = model.config.get_text_config(decoder=True)
    if getattr(cfg, "sliding_window", None) and any(
        t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ["sliding_attention"])
    ):
        raise ValueError(f"kvpass export: sliding-window attention layers (sliding_window={cfg.sliding_window}) are "
                         "not supported by the exporters; use a model with full attention (sliding_window: null)")
    max_pos = int(getattr(cfg, "max_position_embeddings", 4096))
    wrapper = _ExplicitCacheForward(model).eval()
    vocab = int(cfg.vocab_size)
    t = prompt_len if prompt_len is not None else 16
    ids = torch.randint(0, vocab, (1, t))
    positions = torch.arange(t)[None]
    with torch.no_grad():
        if prompt_len is None:
            dim = Dim("prompt", min=2, max=max(max_prompt or max_pos, prefill_block or 0))
            dynamic = ({1: dim}, {1: dim})
        else:
            dynamic = None
        ep = torch.export.export(wrapper, (ids, positions), dynamic_shapes=dynamic, strict=False)
        if prefill_block is None:
            prefill_gm, plans, prefill_counters = _rewrite(ep, options)
            n_layers = len(plans)
            prefill_example = (ids, positions)
            prefill = torch.export.export(_FlatCall(prefill_gm), prefill_example, dynamic_shapes=(
                None if dynamic is None else ((dynamic[0], dynamic[1]),)), strict=False)
            logits, *state = prefill.module()(ids, positions)
        else:
            block_gm, plans, prefill_counters = _rewrite_blocks(ep, options)
            n_layers = len(plans)
            k = next(n for n in block_gm.graph.nodes if n.op == "placeholder" and n.name.startswith("kvpass_store_k"))
            _, kv_heads, _, head_dim = k.meta["example_value"].shape
            ids = torch.randint(0, vocab, (1, prefill_block))
            positions = torch.arange(prefill_block)[None]
            valid = torch.ones(1, prefill_block, dtype=torch.bool)
            state = empty_state([p.capacity for p in plans], int(kv_heads), int(head_dim),
                                k.meta["example_value"].dtype)
            prefill_example = (ids, positions, valid, torch.zeros_like(valid), *state)
            prefill = torch.export.export(_BlockCall(block_gm, n_layers), prefill_example, strict=False)
            logits, *state = prefill.module()(*prefill_example)
            t = prefill_block
        kv_shape = (1, state[0].shape[1], state[0].shape[3])
        stores = state[: 2 * n_layers]
        step_ids, step_pos = ids[:, -1:], torch.tensor([[t]])
        ep = torch.export.export(wrapper, (step_ids, step_pos, *stores), strict=False)
        decode_gm, decode_plans, decode_counters = _rewrite(ep, options)
        _check_decode_inputs(decode_gm, n_layers)
        decode_example = (step_ids, step_pos, *state)
        decode = torch.export.export(_FlatCall(decode_gm), decode_example, strict=False)
    for plan, dplan in zip(plans, decode_plans, strict=True):
        if (plan.budget, plan.capacity) != (dplan.budget, dplan.capacity):
            raise RuntimeError(f"kvpass export: layer {plan.layer} keeps {plan.budget}/{plan.capacity} slots after "
                               f"prefill but {dplan.budget}/{dplan.capacity} after a decode step")
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or getattr(cfg, "eos_token_id", None)
    manifest = {
        "kvpass_version": _version(),
        "manifest_version": MANIFEST_VERSION,
        "model_type": getattr(cfg, "model_type", None),
        "policy": options.policy.spec(),
        "budgets": [p.budget for p in plans],
        "capacities": [p.capacity for p in plans],
        "n_layers": n_layers,
        "kv_heads": kv_shape[1],
        "head_dim": kv_shape[2],
        "vocab_size": vocab,
        "dtype": str(logits.dtype).removeprefix("torch."),
        "kv_dtype": str(state[0].dtype).removeprefix("torch."),
        "batch": 1,
        "prompt_len": prompt_len,
        "max_prompt": None if prompt_len is not None else (max_prompt or max_pos),
        "prefill_block": prefill_block,
        "eos_token_id": [eos] if isinstance(eos, int) else list(eos or []),
        "counters": {"prefill": prefill_counters, "decode": decode_counters},
    }
    return Programs(prefill, decode, prefill_example, decode_example, manifest)


def _version() -> str:
    """The installed kvpass's version, recorded in the manifest."""
    try:
        return importlib.metadata.version("kvpass")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _check_model(model: torch.nn.Module | str | Path) -> None:
    """Refuse a model that is neither a module, a Hugging Face model directory nor a shipped model's name (and a
    shipped model whose weights package is missing) before anything is loaded or written."""
    if isinstance(model, torch.nn.Module):
        return
    from kvpass.models import MODELS
    from kvpass.models.loaders import gguf_sources

    if isinstance(model, str | Path) and Path(model).is_dir():
        if not (Path(model) / "config.json").is_file():
            raise ValueError(f"kvpass export: model folder {str(model)!r} has no config.json: not a Hugging Face "
                             "model directory (save one with model.save_pretrained(folder))")
        return
    if isinstance(model, str) and model in MODELS:
        gguf_sources(model)  # raises, naming the pip command, if the weights package is not installed
        return
    raise ValueError(f"kvpass export: model {str(model)!r} is neither a local Hugging Face model directory nor a "
                     f"model kvpass ships ({', '.join(sorted(MODELS))})")


def resolve_model(model: torch.nn.Module | str | Path) -> torch.nn.Module:
    """A model object as-is; a local Hugging Face model directory; or the name of a model kvpass ships."""
    _check_model(model)
    if isinstance(model, torch.nn.Module):
        return model.eval()
    if Path(model).is_dir():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model, attn_implementation="sdpa", dtype=torch.float32).eval()
    from kvpass.models import load as load_shipped

    return load_shipped(str(model))[0]


def _positive(name: str, value: Any) -> int | None:
    return None if value is None else check_int(value, f"kvpass export: {name}")


def _staging_dir(out: Path) -> Path:
    """A fresh folder beside ``out`` (same filesystem: renamed to ``out`` once complete), with the umask's mode."""
    parent = out.resolve().parent
    if not parent.is_dir():
        raise ValueError(f"kvpass export: cannot write {str(out)!r}: {str(parent)!r} is not an existing folder")
    try:
        staging = Path(tempfile.mkdtemp(prefix=".kvpass-export-", dir=parent))
    except OSError as err:
        raise ValueError(f"kvpass export: cannot write into {str(parent)!r}: {err.strerror or err}") from None
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's private mode would stick to the published artifact
    return staging


def export(
    model: torch.nn.Module | str | Path,
    out: str | Path,
    *,
    format: str = "pt2",
    policy: str = "snapkv",
    budget: int | None = None,
    layer_budgets: list[int] | None = None,
    prompt_len: int | None = None,
    max_prompt: int | None = None,
    prefill_block: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **policy_params: Any,
) -> Path:
    """Export ``model`` with KV compression compiled in; returns the artifact directory ``out``.

    ``model``: a module, a local Hugging Face model directory, or the name of a model kvpass ships.
    ``format``: one of :data:`kvpass.lowering.export.FORMATS` (``get_format(name)`` says what each supports).
    ``policy``/``budget``/``layer_budgets``/``policy_params``: as the backend's options (a ratio is not
    accepted: the exported decode step has a fixed store size). ``prompt_len``: export the prefill for
    exactly that many tokens (required by formats without dynamic shapes); otherwise prompts of
    2..``max_prompt`` tokens (default: the model's ``max_position_embeddings``).
    ``prefill_block``: export the block-wise prefill's block program (``prefill_block`` tokens, static
    shapes) instead; the loader runs it once per block, so every format then takes prompts of any length
    (1..``max_prompt``) and the KV held never exceeds budget + one block.
    Everything is checked before anything is written (``ValueError``, or ``kvpass.OptionError`` for the options);
    the artifact appears only once complete.
    """
    fmt = get_format(format)
    missing = fmt.missing()
    if missing:
        raise ValueError(f"kvpass export: format {format!r} needs the Python package(s) {missing}, which are not "
                         f"installed; install them with: {fmt.install}")
    refused = {k: policy_params[k] for k in ("ratio", "compiler", "fallback") if k in policy_params}
    if refused:
        raise ValueError(f"kvpass export: options {refused} do not apply to an export (the decode step and the "
                         "prefill block have a fixed store size, the format picks the compiler); give budget= or "
                         "layer_budgets=")
    prefill_block = _positive("prefill_block", prefill_block)
    options = parse_options({"policy": policy, "budget": budget, "layer_budgets": layer_budgets,
                             "prefill_block": prefill_block, **policy_params})
    if options.episodes is not None:
        raise ValueError(f"kvpass export: option 'episodes' ({options.episodes}) keeps one cache per episode and "
                         "picks one per question at run time (kvpass.apps.episodic); the exported programs hold a "
                         "single store: export without it")
    prompt_len, max_prompt = _positive("prompt_len", prompt_len), _positive("max_prompt", max_prompt)
    if prompt_len is not None and prompt_len < 2:
        raise ValueError(f"kvpass export: prompt_len must be at least 2, got {prompt_len}")
    if prefill_block is not None:
        if not fmt.prefill_block:
            raise ValueError(f"kvpass export: format {format!r} cannot export --prefill-block {prefill_block}; "
                             f"formats that can: {[f for f in FORMATS if get_format(f).prefill_block]}")
        if prefill_block < 2:
            raise ValueError(f"kvpass export: --prefill-block must be at least 2 tokens, got {prefill_block}")
        if prompt_len is not None:
            raise ValueError(f"kvpass export: --prompt-len {prompt_len} does not apply with --prefill-block "
                             f"{prefill_block}: the block program takes prompts of any length; give one of them")
    elif not fmt.dynamic_prompt and prompt_len is None:
        raise ValueError(f"kvpass export: format {format!r} has static shapes only: give the prompt length the "
                         "prefill is exported for (--prompt-len N / prompt_len=N)")
    _check_model(model)
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise ValueError(f"kvpass export: output {str(out)!r} exists and is not an empty directory; "
                         "choose another path or pass overwrite=True (--overwrite)")

    staging = _staging_dir(out)
    bar = Progress(total=3, enabled=progress)
    ok = False
    try:
        start = time.perf_counter()
        bar.start("loading model")
        module = resolve_model(model)
        bar.done()
        bar.start("torch.export + kvpass rewrite (prefill, decode)")
        programs = export_programs(module, options, prompt_len=prompt_len, max_prompt=max_prompt,
                                   prefill_block=prefill_block)
        bar.done()
        files = fmt.write(programs, staging, bar)
        manifest = {**programs.manifest, "format": format, "files": files,
                    "export_seconds": round(time.perf_counter() - start, 2)}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        bar.done()
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        staging.rename(out)
        ok = True
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        bar.close(ok)
    return out
