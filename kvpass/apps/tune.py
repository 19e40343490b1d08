"""``kvpass tune``: time every launch config of the kernels for the user's shapes, cache the fastest.

The shapes come from a model config (a shipped model name, or a path to an HF ``config.json`` or its
folder) or from explicit sizes; for a KV budget ``C`` and prefill block ``T`` the workloads are a
block prefill (``T`` queries over ``C + T`` slots) and a decode step (1 query over ``C + 1`` slots),
for the fused attention + scores kernel and the compaction kernel (and SnapKV's prefill scores on the
block's ``C + T`` slots with ``--kernels snapkv_scores``); for a diffusion LM's canvas of ``N``
positions (``--canvas``), the Elastic-Cache kernel's denoising step (``--step-rows`` rows over ``N``) and
its refresh (all ``N`` rows). Results go to the JSON cache of
:mod:`kvpass.kernels.tuning` (keyed by kernel, shape bucket, device name and Triton version), which
every kernel launch then reads automatically. ``--smoke`` runs the same pipeline on CPU in Triton's
interpreter (tiny shapes, wall-clock timer) to check an install without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kvpass.errors import KVPassError
from kvpass.validate import check_writable, choice, csv, positive_int

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SMOKE_MAX_QUERIES = 8  # interpreter: ~0.3 ms per program and per block step, so smoke shapes stay tiny
SMOKE_MAX_KEYS = 48
KERNELS = ("attend_scores", "compact", "elastic_drift", "snapkv_scores")
DLLM_TYPES = ("llada",)  # model_type of configs whose attention is Elastic-Cache's (kvpass::elastic_attend)


def add_tune_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tune", help="autotune the Triton kernels for your shapes on this GPU (JSON cache used automatically)",
        description="Time each kernel's launch configs for a model's shapes and write the fastest to the tune "
        "cache, which kernel launches read automatically. --show prints the cache; --smoke runs on CPU.",
    )
    p.add_argument("--model", help="shipped model name or path to an HF config.json (or its folder)")
    p.add_argument("--heads", type=positive_int, help="query heads (instead of --model)")
    p.add_argument("--kv-heads", type=positive_int, help="key/value heads (default: --heads)")
    p.add_argument("--head-dim", type=positive_int, help="head dimension (instead of --model)")
    p.add_argument("--budget", type=positive_int, default=2048, help="KV slots kept per layer (default: %(default)s)")
    p.add_argument("--block", type=positive_int, default=512, help="prefill block length (default: %(default)s)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size (default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="K/V dtype (default: %(default)s)")
    p.add_argument("--canvas", type=positive_int, default=1024,
                   help="diffusion LM canvas, prompt + generation (elastic_drift; default: %(default)s)")
    p.add_argument("--step-rows", type=positive_int, default=64,
                   help="rows run per Elastic-Cache denoising step (elastic_drift; default: %(default)s)")
    p.add_argument("--kernels", type=csv(choice(KERNELS, "kernel")),
                   help=f"comma-separated kernels to tune, of {', '.join(KERNELS)} (default: "
                   "attend_scores,compact; elastic_drift for a diffusion LM config)")
    p.add_argument("--max-configs", type=positive_int, help="time at most this many configs per shape")
    p.add_argument("--cache", help="tune cache file (default: $KVPASS_TUNE_CACHE or ~/.cache/kvpass/tune.json)")
    p.add_argument("--show", action="store_true", help="print the cache and exit")
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke run in Triton's interpreter: tiny shapes, wall-clock timer, few configs")
    return p


def model_shape(name_or_path: str) -> dict[str, int]:
    """``{"heads", "kv_heads", "head_dim"}`` of a shipped model name or an HF config file/folder."""
    from kvpass.models import MODELS

    if name_or_path in MODELS:
        from kvpass.models import load_tokenizer
        from kvpass.models.loaders import converted_dir

        path = converted_dir(name_or_path) / "config.json"
        if not path.is_file():
            load_tokenizer(name_or_path)  # converts the shipped GGUF once (cached), config included
    else:
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"--model {name_or_path!r} is neither a shipped model ({', '.join(sorted(MODELS))}) "
                             f"nor an HF config file or folder (no {str(path)!r})")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--model: cannot read {str(path)!r} as JSON: {e}") from None
    cfg = cfg.get("text_config", cfg)
    try:
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"--model: {str(path)!r} lacks attention sizes ({e!r}); pass --heads/--kv-heads/--head-dim "
                         "instead") from None
    return {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "dllm": cfg.get("model_type") in DLLM_TYPES}


def workloads(args: argparse.Namespace, sizes: dict[str, int]) -> list[tuple[str, dict[str, int]]]:
    """(kernel, shape) pairs to tune: block prefill and decode for each requested kernel."""
    heads, kv_heads, d = sizes["heads"], sizes["kv_heads"], sizes["head_dim"]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    if d > 256:
        raise ValueError(f"head dim must be <= 256 for the kernels, got {d}")
    if args.kernels is None:
        kernels = ["elastic_drift"] if sizes.get("dllm") else ["attend_scores", "compact"]
    else:
        kernels = list(args.kernels)  # checked by --kernels' type; a Namespace built in code is checked here
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown or not kernels:
        raise ValueError(f"--kernels: unknown {unknown or kernels!r}; valid: {', '.join(KERNELS)}")
    if "elastic_drift" in kernels and heads != kv_heads:
        raise ValueError(f"--kernels elastic_drift: the Elastic-Cache attention is multi-head (kv heads = heads); "
                         f"got {heads} heads and {kv_heads} kv heads")
    budget, block, canvas = args.budget, args.block, args.canvas
    step_rows = min(args.step_rows, canvas)
    if args.smoke:
        block, budget = min(block, SMOKE_MAX_QUERIES), min(budget, SMOKE_MAX_KEYS - min(block, SMOKE_MAX_QUERIES))
        canvas, step_rows = min(canvas, SMOKE_MAX_KEYS), min(step_rows, canvas, SMOKE_MAX_QUERIES)
        group = min(heads // kv_heads, 4)
        kv_heads = min(kv_heads, 2)
        heads, d = group * kv_heads, min(d, 32)
    out = []
    for t in (block, 1):
        shape = {"batch": args.batch, "heads": heads, "kv_heads": kv_heads, "head_dim": d, "t": t, "n": budget + t,
                 "budget": budget}
        out += [(k, shape) for k in kernels if k in ("attend_scores", "compact") or k == "snapkv_scores" and t > 1]
    if "elastic_drift" in kernels:  # a denoising step's rows, then a refresh of every position
        for rows in dict.fromkeys((step_rows, canvas)):
            out.append(("elastic_drift", {"batch": args.batch, "heads": heads, "kv_heads": kv_heads, "head_dim": d,
                                          "t": rows, "n": canvas}))
    return out


def _timer(smoke: bool) -> Callable[[Callable[[], object]], float]:
    if not smoke:
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=10, rep=50))

    def cpu_time(fn: Callable[[], object]) -> float:
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - start) * 1000)
        return statistics.median(runs)

    return cpu_time


def _make_call(kernel: str, shape: dict[str, int], dtype: torch.dtype, device: torch.device):
    """(kernel module, fn(config) -> outputs, shape bucket, candidate configs, default config)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    b, hq, hkv, d, t, n = (shape[k] for k in ("batch", "heads", "kv_heads", "head_dim", "t", "n"))
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype)
    k, v = rnd(b, hkv, n, d), rnd(b, hkv, n, d)
    pos = torch.arange(n, device=device).expand(b, hkv, n).contiguous()
    if kernel == "elastic_drift":
        from kvpass.kernels import elastic_drift as mod

        # Elastic-Cache's defaults: up to 32 tracked tokens, a window of 16, a third of the canvas still masked
        rows = torch.randperm(n, generator=gen)[:t].to(device)
        q, kr, vr = (rnd(b, hq, t, d) for _ in range(3))
        kc, vc, qc = (rnd(b, hq, n, d) for _ in range(3))
        track, window = rows[: min(t, 32)], torch.arange(min(t, 16), device=device)
        ones = lambda m: torch.ones(m, device=device)  # noqa: E731
        excluded = (torch.arange(n, device=device) >= n - n // 3)
        inputs = (q, kr, vr, rows, kc, vc, qc, track, ones(len(track)), window, ones(len(window)), excluded)
        fn = lambda cfg: mod.elastic_attend(*inputs, config=cfg)
        args = (b, hq, t, n, d)
        return mod, fn, mod.shape_bucket(q, kc), mod.configs_for(*args), mod.default_config(*args)
    if kernel == "snapkv_scores":  # SnapKV's prefill scoring of the block's candidate slots
        from kvpass.kernels import snapkv_scores as mod

        n_window = min(t, 32)
        obs = torch.rand(b, hq, n, generator=gen).to(device) * n_window
        fn = lambda cfg: mod.snapkv_scores(obs, pos, n_window, n_window, 5, "avg", config=cfg)
        return mod, fn, mod.shape_bucket(obs, hkv), mod.configs_for(n), mod.default_config(n)
    if kernel == "attend_scores":
        from kvpass.kernels import attend_scores as mod

        q = rnd(b, hq, t, d)
        n_obs = min(t, 32)  # SnapKV-like observation window (H2O observes all: same kernels, more rows)
        fn = lambda cfg: mod.attend_scores(q, k, v, pos, d**-0.5, n_obs, config=cfg)
        args = (b, hkv, hq // hkv, t, n, d)
        return mod, fn, mod.shape_bucket(q, k, n_obs), mod.configs_for(*args), mod.default_config(*args)
    from kvpass.kernels import compact as mod

    keep = torch.randn(b, hkv, n, generator=gen).to(device)
    acc = torch.zeros(b, hkv, n, device=device)
    budget = shape["budget"]
    fn = lambda cfg: mod.compact(k, v, pos, keep, acc, budget, budget, config=cfg)
    return mod, fn, mod.shape_bucket(k, budget), mod.configs_for(n, d), mod.default_config(n, d)


def tune(args: argparse.Namespace, out=None) -> dict[str, dict]:
    """Time the configs of each workload; returns the new cache entries (key → record)."""
    out = out or sys.stdout
    import triton
    from tqdm import tqdm

    from kvpass.kernels import tuning

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = DTYPES[args.dtype]
    sizes = model_shape(args.model) if args.model else {
        "heads": args.heads, "kv_heads": args.kv_heads or args.heads, "head_dim": args.head_dim}
    jobs = workloads(args, sizes)
    timer = _timer(args.smoke)
    limit = args.max_configs or (2 if args.smoke else None)
    device_name = tuning.device_name(device)
    entries: dict[str, dict] = {}
    plans = [(kernel, shape, *_make_call(kernel, shape, dtype, device)) for kernel, shape in jobs]
    total = sum(len(([d] + [c for c in cs if c != d])[:limit]) for *_, cs, d in plans)
    with tqdm(total=total, desc="kvpass tune", unit="config", file=sys.stderr, disable=None) as bar:
        for kernel, shape, _mod, fn, bucket, candidates, default in plans:
            configs = ([default] + [c for c in candidates if c != default])[:limit]
            reference = fn(default)
            results = []
            for cfg in configs:
                bar.set_postfix_str(f"{kernel} {bucket}")
                try:
                    got = fn(cfg)
                    for a, r in zip(got, reference, strict=True):  # a config must not change the answer
                        torch.testing.assert_close(a.float(), r.float(), atol=2e-2, rtol=2e-2)
                    results.append((timer(lambda cfg=cfg, fn=fn: fn(cfg)), cfg))
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory on this GPU: skip the config
                    print(f"  skipped {kernel} {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", file=out)
                bar.update(1)
            if not results:
                raise KVPassError(f"kvpass tune: no config of {kernel} ran for shape {shape} (the reasons are above)")
            best_ms, best = min(results, key=lambda r: r[0])
            default_ms = next(ms for ms, cfg in results if cfg == default) if any(
                cfg == default for _, cfg in results) else None
            entries[tuning.entry_key(kernel, bucket, device_name)] = {
                "kernel": kernel, "bucket": bucket, "device": device_name,
                "triton": triton.__version__, "config": best, "ms": round(best_ms, 5),
                "default_config": default, "default_ms": None if default_ms is None else round(default_ms, 5),
                "configs_timed": len(results), "shape": shape, "dtype": args.dtype,
                "date": datetime.date.today().isoformat(), "smoke": bool(args.smoke),
            }
    return entries


def show(path: Path, out=None) -> int:
    out = out or sys.stdout
    from kvpass.kernels import tuning

    entries = tuning.read_cache(path)
    if not entries:
        print(f"no tune cache entries at {str(path)!r} (run `kvpass tune`)", file=out)
        return 0
    print(f"tune cache {str(path)!r}: {len(entries)} entries", file=out)
    print(f"{'kernel':<14} {'shape bucket':<34} {'device':<26} {'triton':<7} {'ms':>9} {'default ms':>10}  config",
          file=out)
    for key in sorted(entries):
        e = entries[key]
        kernel, bucket, device, version = key.split("|")
        dflt = "-" if e.get("default_ms") is None else f"{e['default_ms']:.4f}"
        cfg = " ".join(f"{k}={v}" for k, v in e["config"].items())
        print(f"{kernel:<14} {bucket:<34} {device[:26]:<26} {version:<7} {e['ms']:>9.4f} {dflt:>10}  {cfg}", file=out)
    return 0


def run_tune(args: argparse.Namespace) -> int:
    """Handler of ``kvpass tune``: check the request, time the kernels, write the cache (or ``--show`` it).

    A bad request raises ``ValueError`` (``kvpass tune`` prints it as one line) before anything is timed."""
    if importlib.util.find_spec("triton") is None:
        raise ValueError("the kernels are Triton kernels and Triton is not installed; run: pip install triton")
    from kvpass.kernels import tuning

    path = tuning.cache_path(args.cache)
    if args.show:
        return show(path)
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads TRITON_INTERPRET as it defines a kernel, its own helpers included, and importing kvpass
        # (torch._dynamo) has imported Triton already: run the smoke tune in a process that has it from the start
        if getattr(args, "argv", None) is None:
            raise ValueError("--smoke: set TRITON_INTERPRET=1 before importing kvpass (or run `kvpass tune --smoke`)")
        child = [sys.executable, "-m", "kvpass.apps.cli", *args.argv]
        return subprocess.run(child, env={**os.environ, "TRITON_INTERPRET": "1"}).returncode
    if not args.model and not (args.heads and args.head_dim):
        raise ValueError("give --model NAME_OR_PATH, or --heads, --head-dim (and --kv-heads for GQA)")
    if not args.smoke:
        if not torch.cuda.is_available():
            raise ValueError("no CUDA GPU found (torch.cuda.is_available() is False); run on a GPU machine, "
                             "or pass --smoke for a CPU smoke run in Triton's interpreter")
    else:
        from kvpass.kernels import attend_scores

        try:
            attend_scores.check_device(torch.device("cpu"))
        except RuntimeError as err:  # the kernels were imported before --smoke could set TRITON_INTERPRET
            raise ValueError(f"--smoke: {err}") from None
    check_writable(path, "the tune cache", hint="pass a writable file with --cache or set $KVPASS_TUNE_CACHE")
    entries = tune(args)
    tuning.write_entries(entries, path)
    print(f"wrote {len(entries)} entries to {str(path)!r}")
    for e in entries.values():
        gain = f", default {e['default_ms']:.4f} ms" if e["default_ms"] is not None else ""
        print(f"  {e['kernel']:<14} {e['bucket']:<34} best {e['ms']:.4f} ms{gain}")
    return 0


__all__ = ["add_tune_parser", "model_shape", "run_tune", "show", "tune", "workloads"]
