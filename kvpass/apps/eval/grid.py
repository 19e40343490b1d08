"""``run_grid``: model x policy x budget x benchmark, compiled through the kvpass backend.

Every compressed row compiles the model's forward with
``torch.compile(model.forward, backend="kvpass", options={"policy": p, "budget": b, ...})``; the
full-KV row (policy ``"full"``) runs the uncompiled eager forward and is always present.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from kvpass.apps.eval.benchmarks import BENCHMARKS, DEFAULT_BENCHMARKS, BenchConfig
from kvpass.apps.eval.runner import Forward, greedy_generate, score_continuation
from kvpass.models import DEFAULT_MODEL, MODELS
from kvpass.models import load as load_model
from kvpass.models.data import CorpusUnavailable, LMSample, QASample
from kvpass.validate import check_choice, check_int

__all__ = [
    "FULL",
    "DEFAULT_POLICIES",
    "DEFAULT_BUDGETS",
    "valid_policies",
    "validate_grid",
    "make_forward",
    "stop_ids_for",
    "run_grid",
    "format_table",
]

FULL = "full"
DEFAULT_POLICIES = (FULL, "streaming_llm", "snapkv", "h2o")
DEFAULT_BUDGETS = (256, 512)

Loader = Callable[[str], tuple[torch.nn.Module, Any]]


def valid_policies() -> list[str]:
    """``"full"`` (uncompressed reference) and every kvpass policy name."""
    from kvpass.policies import POLICIES

    return [FULL, *sorted(POLICIES)]


def validate_grid(
    models: Sequence[str],
    policies: Sequence[str],
    budgets: Sequence[int],
    benchmarks: Sequence[str],
    known_models: Sequence[str] | None = None,
) -> None:
    """Raise ``ValueError`` quoting the first bad value and listing the valid ones.

    ``known_models`` defaults to :data:`kvpass.models.MODELS` (a custom loader may know others).
    """
    for kind, plural, values, valid in (
            ("model", "models", models, list(known_models if known_models is not None else MODELS)),
            ("policy", "policies", policies, valid_policies()), ("benchmark", "benchmarks", benchmarks, BENCHMARKS)):
        for value in values:
            check_choice(value, valid, kind, plural)
    for b in budgets:
        check_int(b, "budget")
    if not models or not policies or not benchmarks:
        raise ValueError("models, policies and benchmarks must each name at least one entry")
    if any(p != FULL for p in policies) and not budgets:
        raise ValueError("compressed policies need at least one budget")


def make_forward(
    model: torch.nn.Module, policy: str, budget: int | None, backend_options: dict[str, Any] | None = None
) -> Forward:
    """The forward a row runs: eager for ``"full"``, else compiled through the kvpass backend."""
    if policy == FULL:
        return model.forward
    torch._dynamo.reset()  # each row starts from a clean Dynamo cache
    options = {"policy": policy, "budget": budget, **(backend_options or {})}
    return torch.compile(model.forward, backend="kvpass", options=options)


def stop_ids_for(tokenizer: Any) -> list[int]:
    """EOS and every token whose text holds a newline: each answer is a short single line."""
    ids = {i for i in [tokenizer.eos_token_id] if i is not None}
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    ids.update(i for i, t in enumerate(texts) if "\n" in t)
    return sorted(ids)


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.fmean(xs) if xs else float("nan")


def _summary(metric: str, records: list[dict[str, Any]], by_context: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "n": len(records),
        "prefill_s": _mean([r["prefill_s"] for r in records]),
        "decode_ms_per_token": _mean([r["decode_ms_per_token"] for r in records]),
        "kv_mib": _mean([r["kv_bytes"] / 2**20 for r in records]),
    }
    if metric == "accuracy":
        out["accuracy"] = _mean([float(r["correct"]) for r in records])
    else:
        nll = sum(r["nll_sum"] for r in records)
        out["perplexity"] = math.exp(nll / max(1, sum(r["num_tokens"] for r in records)))
    if by_context:
        lengths = sorted({r["context_tokens"] for r in records})
        out["by_context"] = {
            str(n): _summary(metric, [r for r in records if r["context_tokens"] == n], by_context=False)
            for n in lengths
        }
    return out


def _warm_up(forward: Forward, model: torch.nn.Module, samples: Sequence[Any]) -> float:
    """Run the first prompt, then it minus one token (a second shape), untimed: compiles happen here.

    Returns the seconds spent. Dynamo compiles a static graph for the first shape and a dynamic one
    for the second, so the timed samples after it measure steady-state prefill and decode.
    """
    if not samples:
        return 0.0
    s = samples[0]
    ids = list(s.prompt_ids if isinstance(s, QASample) else s.context_ids)
    t0 = time.perf_counter()
    for prompt in (ids, ids[:-1]):
        greedy_generate(forward, model, prompt, max_new_tokens=3)
    return time.perf_counter() - t0


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _run_sample(forward: Forward, model: torch.nn.Module, tokenizer: Any, sample: Any, stop: list[int]) -> dict:
    if isinstance(sample, QASample):
        g = greedy_generate(forward, model, sample.prompt_ids, sample.max_new_tokens, stop)
        text = tokenizer.decode(list(g.token_ids), skip_special_tokens=True)
        return {
            "uid": sample.uid, "context_tokens": len(sample.prompt_ids), "output": text,
            "answers": list(sample.answers), "correct": sample.is_correct(text), "prefill_s": g.prefill_s,
            "decode_ms_per_token": g.decode_ms_per_token, "kv_bytes": g.kv_bytes, "meta": sample.meta,
        }  # fmt: skip
    assert isinstance(sample, LMSample)
    s = score_continuation(forward, model, sample.context_ids, sample.target_ids)
    return {
        "uid": sample.uid, "context_tokens": len(sample.context_ids), "nll_sum": s.nll_sum,
        "num_tokens": s.num_tokens, "perplexity": s.perplexity, "prefill_s": s.prefill_s,
        "decode_ms_per_token": s.decode_ms_per_token, "kv_bytes": s.kv_bytes, "meta": sample.meta,
    }  # fmt: skip


def run_grid(
    models: Sequence[str] = (DEFAULT_MODEL,),
    policies: Sequence[str] = DEFAULT_POLICIES,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    benchmarks: Sequence[str] = DEFAULT_BENCHMARKS,
    *,
    config: BenchConfig | None = None,
    out_dir: str | Path | None = "results/eval",
    backend_options: dict[str, Any] | None = None,
    plots: bool = True,
    progress: bool = True,
    loader: Loader | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Evaluate every (model, policy, budget, benchmark) cell; the full-KV row is always included.

    Args:
        models: names for :func:`kvpass.models.load` (or for ``loader``).
        policies: ``"full"`` and/or kvpass policy names; ``"full"`` is added when missing.
        budgets: KV slots per layer for compressed policies (the full row has budget ``None``).
        benchmarks: names in :data:`kvpass.apps.eval.benchmarks.BENCHMARKS`.
        config: benchmark sizes and seed.
        out_dir: where ``results.json`` and the plots go (``None``: write nothing).
        backend_options: extra kvpass backend options (e.g. ``{"compiler": "aot_eager"}``).
        plots: draw PNG plots into ``out_dir``.
        progress: show a tqdm progress bar.
        loader: ``name -> (model, tokenizer)``; defaults to :func:`kvpass.models.load`.
        command: the command line recorded in the results.

    Returns:
        ``{"meta": {...}, "rows": [...], "skipped": [...]}`` as also written to ``results.json``.
        Each row has model, policy, budget, benchmark, metric, the summary (accuracy or perplexity,
        mean prefill s, decode ms/token, KV MiB, n) and the per-sample records.
    """
    from tqdm.auto import tqdm

    config = config or BenchConfig()
    policies = list(dict.fromkeys([FULL, *policies]))
    validate_grid(models, policies, budgets, benchmarks, known_models=list(models) if loader else None)
    load_fn: Loader = loader or load_model
    cells = [(p, None) if p == FULL else (p, b) for p in policies for b in ([None] if p == FULL else budgets)]
    result: dict[str, Any] = {
        "meta": {
            "command": command,
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "config": {
                **{k: v for k, v in vars(config).items()},
                "backend_options": backend_options or {},
            },
            "models": list(models),
            "policies": policies,
            "budgets": list(budgets),
            "benchmarks": list(benchmarks),
            "complete": False,
        },  # fmt: skip
        "rows": [],
        "skipped": [],
    }
    t_start = time.perf_counter()
    for model_name in models:
        model, tokenizer = load_fn(model_name)
        stop = stop_ids_for(tokenizer)
        suites: dict[str, Sequence[Any]] = {}
        for bench in benchmarks:
            try:
                suites[bench] = BENCHMARKS[bench].build(tokenizer, config)
            except CorpusUnavailable as err:
                result["skipped"].append({"model": model_name, "benchmark": bench, "reason": str(err)})
        total = len(cells) * sum(len(s) for s in suites.values())
        bar = tqdm(total=total, desc=model_name, disable=not progress, unit="sample")
        for policy, budget in cells:
            forward = make_forward(model, policy, budget, backend_options)
            for bench, samples in suites.items():
                bar.set_postfix_str(f"{policy}/{budget}/{bench}")
                warmup_s = 0.0 if policy == FULL else _warm_up(forward, model, samples)  # eager needs none
                graphs_before = _graphs_compiled()
                records = []
                for sample in samples:
                    records.append(_run_sample(forward, model, tokenizer, sample, stop))
                    bar.update(1)
                metric = BENCHMARKS[bench].metric
                result["rows"].append(
                    {
                        "model": model_name,
                        "policy": policy,
                        "budget": budget,
                        "benchmark": bench,
                        "metric": metric,
                        **_summary(metric, records),
                        "warmup_s": warmup_s,
                        "graphs_compiled_after_warmup": _graphs_compiled() - graphs_before,
                        "samples": records,
                    }  # fmt: skip
                )
                _write(result, out_dir)  # after every row, so an interrupted grid keeps what it measured
        bar.close()
        del model
    result["meta"]["wall_s"] = time.perf_counter() - t_start
    result["meta"]["complete"] = True
    if out_dir is not None and plots:
        from kvpass.apps.eval.plots import plot_results

        result["meta"]["plots"] = [str(p) for p in plot_results(result, Path(out_dir))]
    _write(result, out_dir)
    return result


def _write(result: dict[str, Any], out_dir: str | Path | None) -> None:
    """Write ``results.json`` atomically (``meta.complete`` is true only once the whole grid ran)."""
    if out_dir is None:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(out / "results.json")


def format_table(result: dict[str, Any]) -> str:
    """A fixed-width table of the rows' summaries (one line per row)."""
    head = ("model", "policy", "budget", "benchmark", "n", "score", "prefill s", "decode ms/tok", "KV MiB")
    lines = [head]
    for r in result["rows"]:
        score = f"acc {r['accuracy']:.3f}" if r["metric"] == "accuracy" else f"ppl {r['perplexity']:.2f}"
        lines.append((
            r["model"], r["policy"], "-" if r["budget"] is None else str(r["budget"]), r["benchmark"],
            str(r["n"]), score, f"{r['prefill_s']:.2f}", f"{r['decode_ms_per_token']:.1f}",
            f"{r['kv_mib']:.1f}",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in lines]
    text.insert(1, "-+-".join("-" * w for w in widths))
    for s in result.get("skipped", []):
        text.append(f"skipped {s['benchmark']} for {s['model']}: {s['reason']}")
    return "\n".join(text)
