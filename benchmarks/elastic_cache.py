"""Elastic-Cache vs no cache vs Fast-dLLM dual cache on the shipped LLaDA-style arithmetic model.

    OMP_NUM_THREADS=1 python benchmarks/elastic_cache.py --problems 50 --llada-problems 10

Per generation length (256, 512), on the same problems:

* ``window`` — no cache, Elastic-Cache's decoding rule (sliding window of 16 masks, confidence
  threshold 0.9, stop at the first ``<eos>``): the reference for token agreement;
* ``llada`` — no cache, LLaDA's block decoding (block 32, one token per step, low-confidence
  remasking), on the first ``--llada-problems`` problems (it is slow: gen_length full forwards);
* ``dual`` — Fast-dLLM dual cache (block 32, threshold 0.9);
* ``elastic`` — Elastic-Cache at the default gamma 0.9 (window 16, threshold 0.9, 1 tracked token),
  with ``--drift`` / ``--boundary`` (default: the reference's rule, cosine across heads, cached boundary);
* ``window_top1`` / ``elastic_top1`` — the same two with one token committed per step (the
  reference implementation's ``threshold=None`` mode): more steps, so more for a cache to reuse;
* ``elastic[drift/boundary]`` / ``elastic_top1[drift/boundary]`` — the same with each ``--departures``
  setting (e.g. ``keys/fresh``: kvpass's issue-5 rule), side by side; the gamma sweep runs for each too.

``--accuracy-only``: task accuracy alone on many problems (``accuracy.json``), LLaDA run only where
the threshold rule misses.

Prints and writes (``--out``): task accuracy, token agreement with ``window`` (positions up to the
reference's first ``<eos>``), recomputed token-layers and wall time per method; a gamma sweep at
256 (both decoding modes); the per-step refresh depth of one generation (one token per step);
figures ``refresh_depth.png``, ``gamma_sweep.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from kvpass.models.data.arithmetic import EOS, arithmetic_problems, chance_accuracy, parse_answer
from kvpass.models.llada import load_llada
from kvpass.models.llada_generate import generate_dual_cache, generate_llada, generate_window

from kvpass.apps.elastic import BOUNDARIES, DRIFTS, ElasticCacheGenerator, ElasticConfig
from kvpass.validate import non_negative_int, positive_int


def agreement(ref: torch.Tensor, out: torch.Tensor, plen: int) -> tuple[int, int]:
    """(matching, compared) positions of the generated span up to the reference's first <eos>."""
    gen = ref[0, plen:].tolist()
    span = gen.index(EOS) + 1 if EOS in gen else len(gen)
    same = (ref[0, plen:plen + span] == out[0, plen:plen + span]).sum().item()
    return int(same), span


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def parse_departure(text: str) -> tuple[str, str]:
    """``"keys/fresh"`` -> ``("keys", "fresh")`` (drift statistic, refresh boundary), checked."""
    drift, _, boundary = text.partition("/")
    if drift not in DRIFTS or boundary not in BOUNDARIES:
        raise argparse.ArgumentTypeError(f"departure {text!r}: expected DRIFT/BOUNDARY with DRIFT in {DRIFTS} and "
                                          f"BOUNDARY in {BOUNDARIES}")
    return drift, boundary


def run_length(model, problems, gen_length: int, llada_problems: int, gamma: float, boundary: str,
               compile_backend: str | None, drift: str = "heads",
               departures: tuple[tuple[str, str], ...] = ()) -> dict:
    elastic = ElasticCacheGenerator(model, ElasticConfig(gamma=gamma, drift=drift, boundary=boundary))
    elastic_top1 = ElasticCacheGenerator(model, ElasticConfig(gamma=gamma, drift=drift, boundary=boundary,
                                                              threshold=None))
    others = {}
    for d, b in departures:
        others[f"elastic[{d}/{b}]"] = ElasticCacheGenerator(model, ElasticConfig(gamma=gamma, drift=d, boundary=b))
        others[f"elastic_top1[{d}/{b}]"] = ElasticCacheGenerator(model, ElasticConfig(gamma=gamma, drift=d, boundary=b,
                                                                                      threshold=None))
    compiled = None
    if compile_backend:
        compiled = ElasticCacheGenerator(model, ElasticConfig(gamma=gamma, drift=drift, boundary=boundary,
                                                              compile=compile_backend))
        start = time.perf_counter()
        compiled.generate(torch.tensor([problems[0].prompt_ids()]), gen_length)   # compiles (not timed below)
        print(f"  compiled elastic layers ({compile_backend}) in {time.perf_counter() - start:.0f} s", flush=True)
    rows = {k: {"correct": 0, "n": 0, "seconds": 0.0, "token_layers": 0, "nfe": 0, "same": 0, "compared": 0}
            for k in ("window", "llada", "dual", "elastic", "elastic_compiled", "window_top1", "elastic_top1",
                      *others)}
    depth_trace = None
    for i, p in enumerate(problems):
        prompt = torch.tensor([p.prompt_ids()])
        plen = prompt.shape[1]
        ref, t_ref = timed(generate_window, model, prompt, gen_length)
        runs = {"window": (ref, t_ref)}
        runs["dual"] = timed(generate_dual_cache, model, prompt, gen_length, 32, None, 0.9)
        runs["elastic"] = timed(elastic.generate, prompt, gen_length)
        if compiled is not None:
            runs["elastic_compiled"] = timed(compiled.generate, prompt, gen_length)
        runs["window_top1"] = timed(generate_window, model, prompt, gen_length, 16, None)
        runs["elastic_top1"] = timed(elastic_top1.generate, prompt, gen_length)
        for name, gen in others.items():
            runs[name] = timed(gen.generate, prompt, gen_length)
        if i < llada_problems:
            runs["llada"] = timed(generate_llada, model, prompt, gen_length, 32, gen_length)
        if depth_trace is None:
            depth_trace = runs["elastic"][0].refresh_from
        for name, (out, secs) in runs.items():
            r = rows[name]
            r["n"] += 1
            r["correct"] += parse_answer(out.tokens[0, plen:].tolist()) == p.answer
            r["seconds"] += secs
            r["token_layers"] += out.token_layers
            r["nfe"] += out.nfe
            base = runs["window_top1"][0] if "_top1" in name else ref
            same, compared = agreement(base.tokens, out.tokens, plen)
            r["same"] += same
            r["compared"] += compared
    summary = {}
    for name, r in rows.items():
        if not r["n"]:
            continue
        summary[name] = {"problems": r["n"], "accuracy": r["correct"] / r["n"],
                         "agreement_with_window": r["same"] / r["compared"],
                         "seconds_per_problem": r["seconds"] / r["n"],
                         "token_layers_per_problem": r["token_layers"] / r["n"], "nfe_per_problem": r["nfe"] / r["n"]}
    summary["elastic"]["refresh_depth_trace"] = depth_trace
    return summary


def gamma_sweep(model, problems, gen_length: int, gammas: list[float], boundary: str,
                threshold: float | None = 0.9, drift: str = "heads") -> list[dict]:
    refs = []
    for p in problems:
        prompt = torch.tensor([p.prompt_ids()])
        refs.append(timed(generate_window, model, prompt, gen_length, 16, threshold))
    out = []
    for gamma in gammas:
        gen = ElasticCacheGenerator(model, ElasticConfig(gamma=gamma, drift=drift, boundary=boundary,
                                                         threshold=threshold))
        correct = same = compared = tl = 0
        secs = 0.0
        depths = []
        for p, (ref, _) in zip(problems, refs, strict=True):
            prompt = torch.tensor([p.prompt_ids()])
            res, s = timed(gen.generate, prompt, gen_length)
            secs += s
            tl += res.token_layers
            correct += parse_answer(res.tokens[0, prompt.shape[1]:].tolist()) == p.answer
            a, b = agreement(ref.tokens, res.tokens, prompt.shape[1])
            same, compared = same + a, compared + b
            depths += [0 if d is None else model.config.num_hidden_layers - d for d in res.refresh_from[1:]]
        ref_secs = sum(s for _, s in refs)
        ref_tl = sum(r.token_layers for r, _ in refs)
        out.append({"gamma": gamma, "drift": drift, "boundary": boundary, "threshold": threshold,
                    "accuracy": correct / len(problems),
                    "window_accuracy": sum(parse_answer(r.tokens[0, len(p.prompt_ids()):].tolist()) == p.answer
                                           for p, (r, _) in zip(problems, refs, strict=True)) / len(problems),
                    "agreement": same / compared,
                    "speedup_vs_window": ref_secs / secs, "token_layer_ratio_vs_window": ref_tl / tl,
                    "mean_refresh_depth": sum(depths) / max(1, len(depths)),
                    "refresh_rate": sum(d > 0 for d in depths) / max(1, len(depths))})
        print(f"  gamma {gamma}: {out[-1]}", flush=True)
    return out


def accuracy_check(model, problems, gen_length: int, gamma: float, boundary: str, llada_first: int,
                   drift: str = "heads") -> dict:
    """Task accuracy on many problems, cheaply: the threshold rule without cache, Elastic-Cache at ``gamma``
    and the one-token-per-step rule. LLaDA's slow no-cache block decoding runs only on the first ``llada_first``
    problems and on those the threshold rule misses; counting the problems it did not run as right bounds its
    accuracy from above, so ``gap_to_llada_at_most`` bounds how far Elastic-Cache is below it."""
    elastic = ElasticCacheGenerator(model, ElasticConfig(gamma=gamma, drift=drift, boundary=boundary))
    rules = {"window": lambda x: generate_window(model, x, gen_length),
             "elastic": lambda x: elastic.generate(x, gen_length),
             "window_top1": lambda x: generate_window(model, x, gen_length, 16, None)}
    wrong: dict[str, list[int]] = {name: [] for name in rules}
    for i, p in enumerate(problems):
        prompt = torch.tensor([p.prompt_ids()])
        for name, rule in rules.items():
            if parse_answer(rule(prompt).tokens[0, prompt.shape[1]:].tolist()) != p.answer:
                wrong[name].append(i)
    llada_ran = sorted(set(range(min(llada_first, len(problems)))) | set(wrong["window"]))
    llada_wrong = []
    for i in llada_ran:
        prompt = torch.tensor([problems[i].prompt_ids()])
        out = generate_llada(model, prompt, gen_length, 32, gen_length)
        if parse_answer(out.tokens[0, prompt.shape[1]:].tolist()) != problems[i].answer:
            llada_wrong.append(i)
    n = len(problems)
    result = {name: {"accuracy": 1 - len(w) / n, "wrong": w} for name, w in wrong.items()}
    result["llada"] = {"ran_on": len(llada_ran), "first": llada_first, "wrong": llada_wrong,
                       "accuracy_at_most": 1 - len(llada_wrong) / n}
    result["gap_to_llada_at_most"] = (len(wrong["elastic"]) - len(llada_wrong)) / n
    print(f"  gen {gen_length}: " + ", ".join(f"{k} {result[k]['accuracy']:.4f}" for k in rules)
          + f"; LLaDA no-cache (ran on {len(llada_ran)}: the first {llada_first} and the threshold misses) wrong on "
          f"{llada_wrong}, so Elastic-Cache is at most {100 * result['gap_to_llada_at_most']:.2f} points below it",
          flush=True)
    return result


def drift_stats(model, problems, gen_length: int) -> dict:
    """Both drift statistics of every tested layer, one token per step, never refreshing (gamma -1), as
    ``kvpass::elastic_attend`` computes them and again without the ``1e-8`` clamp of torch's cosine_similarity
    (float64, eps 1e-300): how far apart the reference's (heads) and kvpass's earlier (keys) statistic sit."""
    from unittest import mock

    import torch.nn.functional as F

    cosine = F.cosine_similarity

    def run() -> torch.Tensor:
        gen = ElasticCacheGenerator(model, ElasticConfig(gamma=-1.0, threshold=None))
        sims, call = [], gen._call

        def record(*args):
            out = call(*args)
            sims.append(out[1].detach().clone())
            return out

        gen._call = record
        for p in problems:
            gen.generate(torch.tensor([p.prompt_ids()]), gen_length)
        return torch.stack(sims).double()

    def unclamped(a, b, dim=1, eps=1e-8):
        return cosine(a.double(), b.double(), dim=dim, eps=1e-300).to(a.dtype)

    out = {"problems": len(problems), "gen_length": gen_length}
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    for label, sims in (("as computed", run()), ("unclamped", None)):
        if sims is None:
            with mock.patch.object(F, "cosine_similarity", unclamped):
                sims = run()
        for i, name in enumerate(DRIFTS):
            v = sims[:, i]
            out[f"{name}, {label}"] = {"tests": len(v), "mean": float(v.mean()),
                                       "quantiles_5_25_50_75_95": [round(float(x), 4) for x in v.quantile(q)],
                                       "below_0.9": float((v < 0.9).double().mean())}
            print(f"  {name}, {label}: {out[f'{name}, {label}']}", flush=True)
    return out


def plot(results: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = results["layers"]
    fig, ax = plt.subplots(figsize=(7, 3))
    for g, traces in results["depth_traces"].items():
        depth = [0 if d is None else layers - d for d in traces]
        ax.plot(range(len(depth)), depth, "o-", ms=3, label=f"gamma {g}")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("layers recomputed\nfor all positions")
    ax.set_title(f"Elastic-Cache refresh depth per step (one token per step, gen length {results['sweep_length']}, "
                 "one problem; step 0 is the full first forward)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "refresh_depth.png", dpi=120)

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax1, (key, title) in zip(axes, (("gamma_sweep", "threshold 0.9"), ("gamma_sweep_top1", "one token per step")),
                                 strict=True):
        sweep = results[key]
        g = [r["gamma"] for r in sweep]
        ax1.plot(g, [r["accuracy"] for r in sweep], "o-", color="C0", label="accuracy")
        ax1.plot(g, [r["agreement"] for r in sweep], "s--", color="C2", label="token agreement")
        ax1.axhline(sweep[0]["window_accuracy"], color="C0", lw=0.8, ls=":", label="no-cache accuracy")
        ax1.set_ylim(0.8, 1.02)
        ax1.set_xlabel("gamma")
        ax1.set_ylabel("accuracy / agreement")
        ax2 = ax1.twinx()
        ax2.plot(g, [r["speedup_vs_window"] for r in sweep], "^-", color="C3", label="wall speed-up")
        ax2.plot(g, [r["token_layer_ratio_vs_window"] for r in sweep], "v:", color="C1",
                 label="token-layer reduction")
        ax2.set_ylabel("x vs no cache (same decoding)")
        lines, lines2 = ax1.get_legend_handles_labels(), ax2.get_legend_handles_labels()
        ax1.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="lower left")
        ax1.set_title(f"Elastic-Cache vs gamma, {title} (gen length {results['sweep_length']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "gamma_sweep.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", type=positive_int, default=50)
    ap.add_argument("--llada-problems", type=non_negative_int, default=10,
                    help="LLaDA no-cache decoding runs on this many problems (slow); --accuracy-only: plus the misses")
    ap.add_argument("--sweep-problems", type=positive_int, default=20)
    ap.add_argument("--gen-lengths", type=positive_int, nargs="+", default=[256, 512])
    ap.add_argument("--gammas", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.995])
    ap.add_argument("--gamma", type=float, default=0.9)
    ap.add_argument("--sweep-length", type=positive_int, default=256,
                    help="generation length of the gamma sweep and trace")
    ap.add_argument("--drift", default="heads", choices=DRIFTS,
                    help="drift statistic (heads: the reference's cosine across heads; keys: kvpass's earlier one)")
    ap.add_argument("--boundary", default="cached", choices=BOUNDARIES,
                    help="refresh boundary (cached: the reference's; fresh: also recompute the failing layer)")
    ap.add_argument("--departures", type=parse_departure, nargs="*", default=[],
                    help="also run Elastic-Cache with these DRIFT/BOUNDARY settings side by side (e.g. keys/fresh)")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--compile", default=None, help="also time Elastic-Cache with its layer graphs compiled "
                    "by this torch.compile backend (e.g. inductor)")
    ap.add_argument("--accuracy-only", action="store_true",
                    help="only task accuracy on --problems problems (accuracy.json): see accuracy_check")
    ap.add_argument("--sweep-only", action="store_true",
                    help="only the gamma sweeps (--gammas, on --sweep-problems problems; sweep.json)")
    ap.add_argument("--drift-stats", type=non_negative_int, default=0, metavar="N",
                    help="only the two drift statistics' distributions on N problems (drift_stats.json)")
    ap.add_argument("--out", default="benchmarks/figures/issue5")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_llada()
    problems = arithmetic_problems(args.problems, seed=args.seed)
    if args.drift_stats:
        stats = drift_stats(model, arithmetic_problems(args.drift_stats, seed=args.seed), args.sweep_length)
        (out_dir / "drift_stats.json").write_text(json.dumps({**stats, "date": time.strftime("%Y-%m-%d")}, indent=1))
        print(f"wrote {out_dir}/drift_stats.json")
        return
    if args.sweep_only:
        sweep_problems = arithmetic_problems(args.sweep_problems, seed=args.seed)
        sweeps = {}
        for d, b in [(args.drift, args.boundary), *args.departures]:
            for threshold in (0.9, None):
                print(f"gamma sweep {d}/{b}, threshold {threshold}", flush=True)
                sweeps[f"{d}/{b}/threshold {threshold}"] = gamma_sweep(model, sweep_problems, args.sweep_length,
                                                                      args.gammas, b, threshold, d)
        (out_dir / "sweep.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), **sweeps}, indent=1))
        print(f"wrote {out_dir}/sweep.json")
        return
    if args.accuracy_only:
        checks = {g: accuracy_check(model, problems, g, args.gamma, args.boundary, args.llada_problems, args.drift)
                  for g in args.gen_lengths}
        meta = {"problems": args.problems, "llada_problems": args.llada_problems, "seed": args.seed,
                "gamma": args.gamma, "drift": args.drift, "boundary": args.boundary,
                "date": time.strftime("%Y-%m-%d")}
        (out_dir / "accuracy.json").write_text(json.dumps({**meta, "lengths": checks}, indent=1))
        print(f"wrote {out_dir}/accuracy.json")
        return
    results = {"machine": platform.processor() or platform.machine(), "threads": 1, "gamma": args.gamma,
               "drift": args.drift, "boundary": args.boundary, "departures": [f"{d}/{b}" for d, b in args.departures],
               "command": " ".join(["benchmarks/elastic_cache.py", *(sys.argv[1:] if argv is None else argv)]),
               "date": time.strftime("%Y-%m-%d %H:%M"), "layers": model.config.num_hidden_layers,
               "chance_accuracy": chance_accuracy(problems), "lengths": {}}
    for g in args.gen_lengths:
        print(f"gen length {g}: {args.problems} problems", flush=True)
        s = run_length(model, problems, g, args.llada_problems, args.gamma, args.boundary, args.compile, args.drift,
                       tuple(args.departures))
        e = s["elastic"]
        s["window_top1"]["elastic_top1_speedup"] = (s["window_top1"]["seconds_per_problem"]
                                                    / s["elastic_top1"]["seconds_per_problem"])
        s["window_top1"]["elastic_top1_token_layer_reduction"] = (s["window_top1"]["token_layers_per_problem"]
                                                                  / s["elastic_top1"]["token_layers_per_problem"])
        for name in ("window", "llada", "dual", "elastic_compiled"):
            if name in s:
                s[name]["elastic_speedup"] = s[name]["seconds_per_problem"] / e["seconds_per_problem"]
                s[name]["elastic_token_layer_reduction"] = (s[name]["token_layers_per_problem"]
                                                            / e["token_layers_per_problem"])
        for name in [k for k in s if k.startswith("elastic") and k != "elastic"]:   # every Elastic row vs the baselines
            base = s["window_top1" if "_top1" in name else "window"]
            s[name]["token_layer_reduction_vs_window"] = (base["token_layers_per_problem"]
                                                          / s[name]["token_layers_per_problem"])
            if "llada" in s:
                s[name]["token_layer_reduction_vs_llada"] = (s["llada"]["token_layers_per_problem"]
                                                             / s[name]["token_layers_per_problem"])
                s[name]["speedup_vs_llada"] = s["llada"]["seconds_per_problem"] / s[name]["seconds_per_problem"]
        results["lengths"][g] = s
        for name, r in s.items():
            print(f"  {name:8s} " + " ".join(f"{k}={v:.4g}" for k, v in r.items() if isinstance(v, (int, float))),
                  flush=True)
    sweep_problems = problems[: args.sweep_problems]
    print(f"gamma sweep at {args.sweep_length} on {len(sweep_problems)} problems", flush=True)
    results["sweep_length"] = args.sweep_length
    results["gamma_sweep"] = gamma_sweep(model, sweep_problems, args.sweep_length, args.gammas, args.boundary,
                                         drift=args.drift)
    print("gamma sweep, one token per step", flush=True)
    results["gamma_sweep_top1"] = gamma_sweep(model, sweep_problems, args.sweep_length, args.gammas, args.boundary,
                                              threshold=None, drift=args.drift)
    for d, b in args.departures:
        print(f"gamma sweep, departure {d}/{b} (threshold 0.9, then one token per step)", flush=True)
        results[f"gamma_sweep[{d}/{b}]"] = gamma_sweep(model, sweep_problems, args.sweep_length, args.gammas, b,
                                                       drift=d)
        results[f"gamma_sweep_top1[{d}/{b}]"] = gamma_sweep(model, sweep_problems, args.sweep_length, args.gammas, b,
                                                            threshold=None, drift=d)
    traces = {}
    prompt = torch.tensor([problems[0].prompt_ids()])
    for gamma in (0.8, 0.9, 0.98):
        traces[gamma] = ElasticCacheGenerator(model, ElasticConfig(gamma=gamma, drift=args.drift,
                                                                   boundary=args.boundary,
                                                                   threshold=None)).generate(
            prompt, args.sweep_length).refresh_from
    results["depth_traces"] = traces
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out_dir)
    print(f"wrote {out_dir}/results.json, refresh_depth.png, gamma_sweep.png")


if __name__ == "__main__":
    main()
