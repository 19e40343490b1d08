"""Many conversations through one compiled model: lockstep decoding against each alone, and memory under churn.

kvpass's state of a store travels with the cache that holds it (``kvpass/runtime/state.py``), so conversations that
share one compiled forward must not see each other. On a real model (SmolLM2-135M by default, essay text):

* **lockstep**: for each count in ``--lockstep`` (2 and 8), that many conversations (different essay windows of
  ``--prompt`` tokens, each with its own ``kvpass.CompressedCache``) decode ``--steps`` greedy tokens each, first each
  alone, then all together one step each in turn; the row counts the conversations whose tokens are identical;
* **churn**: ``--conversations`` (200) short conversations with fresh caches, one after the other; the process's RSS
  and the bytes of live tensors other than the model's parameters are sampled every ``--every`` conversations:
  memory held for conversations must return to its starting level, not grow with their number.

    python benchmarks/many_conversations.py                           # SmolLM2-135M, H2O, budget 128
    python benchmarks/many_conversations.py --policy snapkv --compiler aot_eager --out results/many.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import psutil
import torch

from kvpass.validate import csv, positive_int


def live_tensor_bytes(exclude: set[int]) -> tuple[int, int]:
    """(count, bytes) of live real tensors whose storage is not in ``exclude`` (the model's parameters and buffers);
    the compiler's fake tensors (subclasses, no storage) are not counted."""
    gc.collect()
    count = nbytes = 0
    for obj in gc.get_objects():
        if type(obj) is torch.Tensor and not obj.is_meta:
            storage = obj.untyped_storage()
            if storage.data_ptr() not in exclude:
                count += 1
                nbytes += storage.nbytes()
    return count, nbytes


class Conversation:
    """Greedy decoding of one prompt with its own cache, one forward per ``step()``."""

    def __init__(self, forward, model, prompt: list[int]) -> None:
        import kvpass

        self.forward, self.prompt = forward, prompt
        self.cache = kvpass.CompressedCache(config=model.config)
        self.tokens: list[int] = []

    @torch.inference_mode()
    def step(self) -> None:
        if self.tokens:
            ids, start = torch.tensor([self.tokens[-1:]]), len(self.prompt) + len(self.tokens) - 1
        else:
            ids, start = torch.tensor([self.prompt]), 0
        out = self.forward(input_ids=ids, position_ids=torch.arange(start, start + ids.shape[1])[None],
                           cache=self.cache, use_cache=True, logits_to_keep=1)
        self.tokens.append(int(out.logits[0, -1].argmax()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--policy", default="h2o")
    parser.add_argument("--budget", type=positive_int, default=128)
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager"])
    parser.add_argument("--prompt", type=positive_int, default=512, help="lockstep prompt tokens (%(default)s)")
    parser.add_argument("--steps", type=positive_int, default=16, help="lockstep tokens per conversation")
    parser.add_argument("--lockstep", type=csv(positive_int), default=[2, 8], help="conversation counts (2,8)")
    parser.add_argument("--conversations", type=positive_int, default=200, help="churn: conversations (%(default)s)")
    parser.add_argument("--churn-prompt", type=positive_int, default=192, help="churn: prompt tokens (%(default)s)")
    parser.add_argument("--churn-steps", type=positive_int, default=4, help="churn: tokens per conversation")
    parser.add_argument("--every", type=positive_int, default=25, help="churn: sample memory every N conversations")
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from kvpass.models import load
    from kvpass.models.data.corpora import essays_text

    model, tokenizer = load(args.model)
    model.eval()
    text = tokenizer.encode(essays_text())
    need = max(args.lockstep) * args.prompt
    if len(text) < need:
        parser.error(f"--lockstep {max(args.lockstep)} x --prompt {args.prompt} = {need} tokens, but the essays have "
                     f"{len(text)}")
    options = {"policy": args.policy, "budget": args.budget, "compiler": args.compiler}
    forward = torch.compile(model.forward, backend="kvpass", options=options)
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    started = time.perf_counter()

    lockstep = []
    for n in args.lockstep:
        prompts = [text[i * args.prompt: (i + 1) * args.prompt] for i in range(n)]
        alone = []
        for prompt in prompts:
            conv = Conversation(forward, model, prompt)
            for _ in range(args.steps):
                conv.step()
            alone.append(conv.tokens)
        convs = [Conversation(forward, model, prompt) for prompt in prompts]
        for _ in range(args.steps):
            for conv in convs:
                conv.step()
        same = sum(c.tokens == a for c, a in zip(convs, alone, strict=True))
        lockstep.append({"conversations": n, "identical": same, "distinct_outputs": len({str(a) for a in alone})})
        print(f"lockstep {n}: {same}/{n} conversations give their tokens alone "
              f"({len({str(a) for a in alone})} distinct outputs)", flush=True)
        del convs, conv

    process = psutil.Process(os.getpid())
    samples = []
    for i in range(args.conversations + 1):
        if i % args.every == 0:
            count, nbytes = live_tensor_bytes(params)
            samples.append({"after": i, "rss_mib": round(process.memory_info().rss / 2**20, 1),
                            "live_tensors": count, "live_tensor_mib": round(nbytes / 2**20, 3)})
            print(f"churn: after {i:4d} conversations: RSS {samples[-1]['rss_mib']} MiB, "
                  f"{count} live tensors outside the model ({samples[-1]['live_tensor_mib']} MiB)", flush=True)
        if i == args.conversations:
            break
        start = (i * 97) % (len(text) - args.churn_prompt)
        conv = Conversation(forward, model, text[start: start + args.churn_prompt])
        for _ in range(args.churn_steps):
            conv.step()
        del conv

    result = {"args": vars(args), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "seconds": round(time.perf_counter() - started, 1), "lockstep": lockstep, "churn": samples}
    first, last = samples[1] if len(samples) > 1 else samples[0], samples[-1]
    print(f"churn: live tensors outside the model after conversation {first['after']}: {first['live_tensors']} "
          f"({first['live_tensor_mib']} MiB); after {last['after']}: {last['live_tensors']} "
          f"({last['live_tensor_mib']} MiB); RSS {first['rss_mib']} -> {last['rss_mib']} MiB")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
