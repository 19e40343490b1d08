"""Question-agnostic NIAH (kvpress's protocol): compress the haystack before the question is seen.

For each NIAH-style prompt (``kvpass.models.data.niah``) the context (everything before the question) is
prefilled through the kvpass backend and compressed to ``budget`` slots per layer; then the question is
appended to the compressed cache and the answer decoded greedily. Methods:

* ``full``: budget = context length (no eviction; checks the pipeline),
* ``snapkv-block``, ``h2o-block``, ``streaming_llm-block``: block-wise prefill with the policy's own rule,
* ``repeat-block``: block-wise, each block scored by a copy of itself appended as observation queries
  (EpiCache's patched-prompt scoring with the block as its own patched prompt, KVzip-style),
* ``episodic``: :class:`kvpass.episodic.EpisodicCache`, K-means episodes over sentence windows, the
  question routed to its episode's cache.

    python benchmarks/question_agnostic_niah.py --lengths 1024 --methods repeat-block,snapkv-block --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _question_ids(tokenizer, sample) -> list[int]:
    from kvpass.models.data.samples import encode

    key = sample.meta["key"]
    q = encode(tokenizer, f"\n\nQuestion: What is the special magic number for {key} mentioned in the text above?"
                          f"\nAnswer: The special magic number for {key} is")
    if list(sample.prompt_ids[-len(q):]) != q:
        raise SystemExit("the NIAH prompt does not end with the expected question")
    return q


def _sentence_segments(tokenizer, ids: list[int], per_segment: int = 3) -> list[tuple[int, int]]:
    ends = [i + 1 for i, t in enumerate(ids) if tokenizer.decode([t]).rstrip().endswith((".", "?", "!"))]
    bounds = [0, *ends[per_segment - 1 :: per_segment]]
    if bounds[-1] != len(ids):
        bounds.append(len(ids))
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _needle_kept(ctx, span: list[int]) -> float:
    """Fraction of the asked needle's tokens held, over every layer and kv-head of the compressed context."""
    held = [torch.isin(torch.arange(*span), state.pos.reshape(-1, state.pos.shape[-1])[h]).float().mean()
            for state in ctx.layers.values() for h in range(state.pos.shape[0] * state.pos.shape[1])]
    return float(torch.stack(held).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", default="1024,2048")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--ratio", type=float, default=0.25, help="budget as a fraction of the context (0.25 = 4x)")
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--kernel-size", type=int, default=1, help="EpiCache: max-pool scores along keys")
    p.add_argument("--methods", default="full,snapkv-block,repeat-block")
    p.add_argument("--compiler", default="aot_eager")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="results/question_agnostic_niah.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import kvpass.models
    from kvpass.models.data.niah import niah_samples

    from kvpass.episodic import EpisodicCache, answer, compress_context

    model, tok = kvpass.models.load(args.model)
    stop = [tok.eos_token_id]
    lengths = [int(x) for x in args.lengths.split(",")]
    samples = niah_samples(tok, lengths=lengths, depths=[float(d) for d in args.depths.split(",")], seed=args.seed)
    rows = []
    for method in args.methods.split(","):
        torch._dynamo.reset()
        for length in lengths:
            cell = [s for s in samples if s.meta["length"] == length]
            context_len = length - len(_question_ids(tok, cell[0]))
            budget = context_len + 1 if method == "full" else max(1, round(args.ratio * context_len))
            policy = {"repeat-block": "epicache", "episodic": "epicache", "full": "snapkv"}.get(
                method, method.removesuffix("-block"))
            options = {"policy": policy, "budget": budget, "prefill_block": args.block, "compiler": args.compiler}
            if method == "repeat-block":
                options.update(window=args.block, accumulate=True, kernel_size=args.kernel_size)
            if method == "episodic":
                options["episodes"] = args.episodes
            forward = torch.compile(model.forward, backend="kvpass", options=options, dynamic=True)
            correct = 0
            for s in cell:
                q = _question_ids(tok, s)
                context = list(s.prompt_ids[: -len(q)])
                t0 = time.perf_counter()
                if method == "episodic":
                    epi = EpisodicCache(forward, model, options, seed=args.seed)
                    epi.build(context, _sentence_segments(tok, context))
                    out, episode = epi.answer(q, 12, stop)
                    kept = _needle_kept(epi.contexts[episode], s.meta["needle_spans"][0])
                else:
                    ctx = compress_context(forward, model, options, context,
                                           observe="repeat" if method == "repeat-block" else None)
                    kept = _needle_kept(ctx, s.meta["needle_spans"][0])
                    out = answer(forward, model, options, ctx, q, 12, stop)
                text = tok.decode(out, skip_special_tokens=True)
                ok = s.is_correct(text)
                correct += ok
                rows.append({"method": method, "length": length, "depth": s.meta["depth"], "budget": budget,
                             "answer": s.answers[0], "output": text, "correct": ok, "needle_kept": kept,
                             "seconds": round(time.perf_counter() - t0, 1)})
                print(f"{method:>14} {length:>5} depth {s.meta['depth']:.1f} budget {budget}: {text!r} "
                      f"needle kept {kept:.2f} "
                      f"({'ok' if ok else 'wrong'}, want {s.answers[0]})", flush=True)
            print(f"== {method} {length}: {correct}/{len(cell)}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
