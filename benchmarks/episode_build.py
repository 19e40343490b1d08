"""EpiCache's build cost: every episode's cache in one batched block-wise prefill vs one prefill per episode.

The episodes' caches are the same context compressed under different patched prompts. Built as the rows of one
batch (:func:`kvpass.apps.episodic.compress_episodes`), each block runs once over the model's weights for all
episodes; built one after the other (the reference's loop), once per episode. The batch saves launches and weight
reads, but pads every row's prompt to the longest; grouped (the default ``batch_padding``), episodes share a batch
only while the padding stays under that fraction of the real rows. The rows are timed side by side on the same
conversation, beside one plain block-wise prefill of the context (no observation prompt: what a single compressed
cache costs), after a warm-up run of each that pays the compiles. The builds' caches are checked to hold the same
positions.

    python benchmarks/episode_build.py --model smollm2-135m --episodes 4 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from kvpass.validate import positive_int


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--episodes", type=positive_int, default=4)
    p.add_argument("--sessions", type=positive_int, default=6, help="LoCoMo-style sessions of the conversation")
    p.add_argument("--session-tokens", type=positive_int, default=250)
    p.add_argument("--budget", type=positive_int, default=384)
    p.add_argument("--block", type=positive_int, default=256)
    p.add_argument("--medoids", type=positive_int, default=8)
    p.add_argument("--batch-padding", type=float, default=0.1,
                   help="the grouped row's batch_padding (default: %(default)s, EpisodicCache's)")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--compiler", default="aot_eager")
    p.add_argument("--out", default="results/episode_build")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import kvpass.models
    from kvpass.models.data import conversation_samples
    from kvpass.models.data.samples import encode

    from kvpass.apps.episodic import (
        EpisodicCache,
        compress_context,
        episode_batches,
        patched_prompt_prefix,
        text_segments,
    )
    from kvpass.ops import slot_heads
    from kvpass.runtime.state import store_state

    model, tok = kvpass.models.load(args.model)
    sample = conversation_samples(tok, num_conversations=1, num_sessions=args.sessions,
                                  session_tokens=args.session_tokens, questions_per_conversation=1, seed=1)[0]
    context = list(sample.prompt_ids[: sample.meta["context_tokens"]])
    segments = text_segments(tok, context, 4, newline=True)
    options = {"policy": "epicache", "budget": args.budget, "prefill_block": args.block, "episodes": args.episodes,
               "reserve": 64, "compiler": args.compiler}
    forward = torch.compile(model.forward, backend="kvpass", options=options, dynamic=True)
    common = {"medoids": args.medoids, "prefix_ids": patched_prompt_prefix(tok), "separator_ids": encode(tok, "\n")}
    grouped = f"batched, grouped (padding <= {args.batch_padding:g})"
    builders = {"batched, one batch": EpisodicCache(forward, model, options, batched=True,
                                                    batch_padding=float("inf"), **common),
                grouped: EpisodicCache(forward, model, options, batched=True, batch_padding=args.batch_padding,
                                       **common),
                "sequential": EpisodicCache(forward, model, options, batched=False, **common)}
    plain_options = {k: v for k, v in options.items() if k != "episodes"} | {"scores": "forward"}
    plain_forward = torch.compile(model.forward, backend="kvpass", options=plain_options, dynamic=True)

    def plain() -> None:
        compress_context(plain_forward, model, plain_options, context)

    runs = {name: (lambda b=builder: b.build(context, segments)) for name, builder in builders.items()}
    runs["one block-wise prefill"] = plain
    for run in runs.values():  # warm-up: compiles
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so machine load hits every row alike
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - t0)
    def same_layer(a, b) -> bool:  # kvpass's stores: the same kept positions; a layer left to HF (a sliding
        # window): the same keys
        if store_state(a.keys) is None:
            return store_state(b.keys) is None and torch.equal(a.keys, b.keys)
        return torch.equal(slot_heads(store_state(a.keys).pos, True)[0], slot_heads(store_state(b.keys).pos, True)[0])

    same = all(same_layer(a, b)
               for name, builder in builders.items() if name != "sequential"
               for one, other in zip(builder.contexts, builders["sequential"].contexts, strict=True)
               for a, b in zip(one.cache.layers, other.cache.layers, strict=True))
    prompt_tokens = [len(x) for x in builders["sequential"].patched_prompts]
    median = {name: statistics.median(s) for name, s in seconds.items()}
    rows = [{"build": name, "median_s": round(median[name], 3), "runs_s": [round(x, 3) for x in seconds[name]],
             "vs_sequential": round(median[name] / median["sequential"], 3)} for name in runs]
    meta = {"args": vars(args), "date": dt.datetime.now().isoformat(timespec="minutes"),
            "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "context_tokens": len(context), "segments": len(segments),
            "patched_prompt_tokens": prompt_tokens,
            "grouped_batches": episode_batches([n + args.block for n in prompt_tokens], args.batch_padding),
            "same_kept_positions": same, "torch": torch.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"{args.model}: {len(context)}-token conversation, {args.episodes} episodes, patched prompts "
          f"{prompt_tokens} tokens (grouped: {meta['grouped_batches']}), {args.threads} thread(s); every build's "
          f"caches == sequential's: {same}")
    for r in rows:
        print(f"  {r['build']:>36}: {r['median_s']:8.2f} s (median of {args.repeats}), {r['vs_sequential']:.2f}x "
              "sequential")


if __name__ == "__main__":
    main()
