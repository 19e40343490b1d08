"""kvpress-faithful PyramidKV, protected windows and block-wise pooling (issue 19): the former rules against the new.

Question-agnostic NIAH (``benchmarks/question_agnostic.py``'s protocol: the context is compressed once, then the
question is appended and answered greedily) on a shipped model, one row per method:

* ``pyramidkv-old``: kvpass's former PyramidKV — budgets falling linearly from ``2·avg − avg/beta`` to ``avg/beta``
  with neither kvpress's cap nor its fallback, and the whole window protected even where it exceeds a layer's
  budget (the compaction then kept the window's *oldest* tokens);
* ``pyramidkv-old-budgets``: the former budgets with today's protection (the newest ``min(window, budget)`` kept);
* ``pyramidkv``: kvpress's rule (``PyramidKVPress.get_layer_budget``; at ``avg`` < ``beta·window`` it is uniform
  SnapKV);
* ``snapkv-block-old``: block-wise SnapKV's former block rule — each slot's score the max of its carried score and
  the block window's attention, not pooled;
* ``snapkv-block``: kvpress's ``BlockPress`` around ``SnapKVPress`` — every block rescores store and block with the
  prompt rule (window mean, pooled along the keys, GQA mean).

The former rules live here only (as policies registered for this run). Per prompt: answer correct, share of the
needle held (all layers x kv heads), and the share of the context's newest ``min(window, slots)`` positions held by
the last layer (``slots``: the real tokens its store holds).

    python benchmarks/kvpress_faithful.py --length 2048 --budget 512 --threads 1 --out results/kvpress_faithful
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from kvpass.policies import POLICIES, PyramidKV, SnapKV
from kvpass.policies.base import group_mean, protect, recent_mask
from kvpass.runtime.state import store_state
from kvpass.validate import ArgType, csv, fraction, positive_int

METHODS = ("pyramidkv-old", "pyramidkv-old-budgets", "pyramidkv", "snapkv-block-old", "snapkv-block")


def _method(m: str) -> str:
    if m not in METHODS:
        raise ValueError(f"unknown method {m!r}; valid: {', '.join(METHODS)}")
    return m


def old_pyramid_budget(total: int, layer: int, n_layers: int, beta: int) -> int:
    """kvpass's former PyramidKV budgets: linear, no cap, no fallback."""
    if n_layers == 1:
        return total
    low = total / beta
    high = 2 * total - low
    return max(1, round(high - layer * (high - low) / (n_layers - 1)))


@dataclasses.dataclass(frozen=True)
class OldPyramidKV(PyramidKV):
    """The former PyramidKV: former budgets, the whole window protected (oldest kept when it exceeds the budget)."""

    name = "pyramidkv_old"

    def layer_budget(self, total, layer, n_layers, prompt_len=None):
        return old_pyramid_budget(total, layer, n_layers, self.beta)

    def score(self, obs, keys, pos, acc, n_new, budget):
        keep, acc = super().score(obs, keys, pos, acc, n_new, budget)
        return protect(acc, recent_mask(pos, self.window)), acc


@dataclasses.dataclass(frozen=True)
class OldBlockSnapKV(SnapKV):
    """The former block-wise SnapKV: a block keeps each slot's max of its carried score and the block's window
    attention, unpooled (the prompt and decode rules unchanged)."""

    name = "snapkv_block_old"

    def score(self, obs, keys, pos, acc, n_new, budget):
        if keys.shape[2] == n_new:
            return super().score(obs, keys, pos, acc, n_new, budget)
        acc = torch.maximum(acc, group_mean(obs, keys.shape[1]) / self.n_obs(n_new))
        return protect(acc, recent_mask(pos, self.window)), acc


POLICIES.setdefault(OldPyramidKV.name, OldPyramidKV)
POLICIES.setdefault(OldBlockSnapKV.name, OldBlockSnapKV)


def held(stores: list[torch.Tensor], positions: range) -> float:
    """Share of ``positions`` held, over the given layers' stores (``[H_kv, slots]`` positions each) and kv heads."""
    wanted = torch.tensor(list(positions))
    return float(torch.stack([torch.isin(wanted, row).float().mean() for pos in stores for row in pos]).mean())


def options_for(method: str, args, n_layers: int) -> dict:
    base = {"budget": args.budget, "compiler": args.compiler, "window": args.window}
    if method == "pyramidkv-old":
        return {**base, "policy": OldPyramidKV.name}
    if method == "pyramidkv-old-budgets":
        base.pop("budget")
        return {**base, "policy": "pyramidkv",
                "layer_budgets": [old_pyramid_budget(args.budget, i, n_layers, 20) for i in range(n_layers)]}
    if method == "pyramidkv":
        return {**base, "policy": "pyramidkv"}
    policy = OldBlockSnapKV.name if method == "snapkv-block-old" else "snapkv"
    return {**base, "policy": policy, "prefill_block": args.block}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", type=csv(ArgType(str, _method, "a method")), default=list(METHODS),
                   help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--length", type=positive_int, default=2048)
    p.add_argument("--depths", type=csv(fraction()), default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--budget", type=positive_int, default=512)
    p.add_argument("--window", type=positive_int, default=64)
    p.add_argument("--block", type=positive_int, default=256)
    p.add_argument("--compiler", default="aot_eager")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="results/kvpress_faithful")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import kvpass.models
    import question_agnostic as qa

    from kvpass.apps.episodic import answer, compress_context
    from kvpass.apps.eval.grid import stop_ids_for

    model, tok = kvpass.models.load(args.model)
    stop = stop_ids_for(tok)
    qa_args = argparse.Namespace(lengths=[args.length], depths=args.depths, seed=args.seed)
    contexts = qa._contexts("niah", tok, qa_args)
    n_layers = model.config.num_hidden_layers
    records = []
    started = dt.datetime.now().isoformat(timespec="minutes")
    for method in args.methods:
        torch._dynamo.reset()
        options = options_for(method, args, n_layers)
        forward = torch.compile(model.forward, backend="kvpass", options=options, dynamic=True)
        for c in contexts:
            n = len(c["context"])
            t0 = time.perf_counter()
            ctx = compress_context(forward, model, options, c["context"])
            compress_s = time.perf_counter() - t0
            stores = [store_state(layer.keys).pos[0] for layer in ctx.cache.layers]  # [H_kv, slots] per layer
            # the last layer's store against the newest positions it could hold (min(window, its slots))
            slots = int((stores[-1] >= 0).sum(dim=-1).min())
            tail_held = held(stores[-1:], range(n - min(args.window, slots), n))
            for q_ids, sample, span in c["questions"]:
                text = tok.decode(answer(forward, model, ctx, q_ids, sample.max_new_tokens, stop),
                                  skip_special_tokens=True)
                kept = held(stores, range(*span))
                records.append({"method": method, "uid": sample.uid, "context_tokens": n, "answer": sample.answers[0],
                                "output": text, "correct": sample.is_correct(text), "needle_kept": kept,
                                "last_layer_slots": slots, "last_layer_tail_held": tail_held,
                                "compress_s": round(compress_s, 2)})
                print(f"{method:>22} {sample.uid}: {text!r} (want {sample.answers[0]}, "
                      f"{'ok' if records[-1]['correct'] else 'wrong'}); needle kept {kept:.2f}; last layer "
                      f"({slots} slots) holds {tail_held:.2f} of the newest {min(args.window, slots)}; "
                      f"compress {compress_s:.1f} s", flush=True)
    summary = []
    for method in args.methods:
        rs = [r for r in records if r["method"] == method]
        summary.append({"method": method, "n": len(rs), "correct": sum(r["correct"] for r in rs),
                        "needle_kept": statistics.fmean(r["needle_kept"] for r in rs),
                        "last_layer_tail_held": statistics.fmean(r["last_layer_tail_held"] for r in rs),
                        "compress_s_median": statistics.median(r["compress_s"] for r in rs)})
    print(f"\n{'method':>22} {'correct':>8} {'needle kept':>11} {'last-layer tail':>15} {'compress s':>10}")
    for s in summary:
        print(f"{s['method']:>22} {s['correct']:>4}/{s['n']:<3} {s['needle_kept']:>11.3f} "
              f"{s['last_layer_tail_held']:>15.2f} {s['compress_s_median']:>10.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"args": vars(args), "started": started, "finished": dt.datetime.now().isoformat(timespec="minutes"),
            "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__}
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "records": records}, indent=1))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
