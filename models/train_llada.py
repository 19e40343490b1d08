"""Train the shipped tiny LLaDA-style diffusion LM on multi-step arithmetic (CPU, 1 thread, seeded).

    OMP_NUM_THREADS=1 python -m kvpass.models.train_llada --out models/checkpoints/llada-arith

Objective: LLaDA's SFT masked-diffusion loss — the prompt stays clean, each answer token is masked
with probability ``t ~ U(0, 1)`` and the loss is the cross-entropy on masked tokens. Half of the
sequences instead mask a random suffix of the answer (the left-to-right states the decoders visit).
The ``<eos>`` padding beyond the first ``<eos>`` is down-weighted to at most ``pad_weight`` tokens'
worth of loss per sequence, so long canvases do not drown the solution.

Curriculum over the canvas length: stage 1 trains on short canvases (the arithmetic), stage 2
mixes in canvases of 64..512 positions at a constant token budget per step, so the model also
meets the long all-mask suffixes of generation lengths 256 and 512. And over the mask ratio: for
the first ``--mask-warmup`` of the steps its cap grows from 0.15 to 1 (suffix masking phasing in
alongside), so early batches mostly hide running totals whose neighbours are visible — the
one-step rule is learnt before the model meets long masked suffixes.
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
import torch.nn.functional as F

from .data.arithmetic import BOS, EOS, MASK, VOCAB, arithmetic_problems, parse_answer, solution_length
from .llada import LLaDAConfig, LLaDAModelLM
from .llada_generate import generate_window


def make_batch(rng: random.Random, n_seq: int, gen_length: int, n_steps: int, seed: int,
               pad_weight: float, t_max: float = 1.0, suffix_prob: float = 0.5
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy input ids, clean targets, per-token loss weights) for ``n_seq`` problems."""
    problems = arithmetic_problems(n_seq, n_steps, seed=seed)
    sol = solution_length(n_steps)
    rows, targets, weights = [], [], []
    for p in problems:
        prompt, answer = p.prompt_ids(), p.answer_ids(gen_length)
        clean = torch.tensor(prompt + answer)
        masked = torch.zeros(len(clean), dtype=torch.bool)
        if rng.random() < 1.0 - suffix_prob:
            t = rng.uniform(1.0 / gen_length, t_max)
            masked[len(prompt):] = torch.rand(gen_length) < t
        else:
            cut = rng.randrange(sol)
            masked[len(prompt) + cut:] = True
            masked[len(prompt):len(prompt) + cut] = torch.rand(cut) < rng.uniform(0.0, 0.3 * t_max)
        if not masked.any():
            masked[len(prompt) + rng.randrange(gen_length)] = True
        w = masked.float()
        pad = masked.clone()
        pad[: len(prompt) + sol] = False
        n_pad = int(pad.sum())
        if n_pad > pad_weight:
            w[pad] = pad_weight / n_pad
        rows.append(torch.where(masked, torch.tensor(MASK), clean))
        targets.append(clean)
        weights.append(w)
    return torch.stack(rows), torch.stack(targets), torch.stack(weights)


def canvas_for_step(rng: random.Random, step: int, steps: int, stage1_frac: float) -> int:
    if step < stage1_frac * steps:
        return rng.choice([20, 24, 32, 48])
    return rng.choice([24, 32, 48, 64, 128, 256, 512])


@torch.no_grad()
def accuracy(model: LLaDAModelLM, n: int, gen_length: int, n_steps: int, seed: int) -> float:
    model.eval()
    correct = 0
    for p in arithmetic_problems(n, n_steps, seed=seed):
        out = generate_window(model, torch.tensor([p.prompt_ids()]), gen_length=gen_length)
        gen = out.tokens[0, len(p.prompt_ids()):].tolist()
        correct += parse_answer(gen) == p.answer
    model.train()
    return correct / n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="checkpoint directory (config.json + model.safetensors)")
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--tokens-per-step", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--stage1-frac", type=float, default=0.6)
    ap.add_argument("--pad-weight", type=float, default=4.0)
    ap.add_argument("--mask-warmup", type=float, default=0.3,
                    help="fraction of steps over which the mask ratio cap grows from 0.15 to 1 (0: no ramp)")
    ap.add_argument("--n-steps", type=int, default=8)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--final-eval", type=int, default=50, help="problems for the final accuracy (0: skip)")
    ap.add_argument("--max-minutes", type=float, default=60.0, help="stop (and save) after this much wall time")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="stop (and save) after this many steps, keeping the --steps learning-rate schedule")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    cfg = LLaDAConfig(vocab_size=len(VOCAB), hidden_size=args.hidden, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      bos_token_id=BOS, eos_token_id=EOS, mask_token_id=MASK)
    model = LLaDAModelLM(cfg).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M  config {cfg.to_dict()}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = min(200, args.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    start, ema = time.time(), None
    for step in range(args.steps):
        gen_length = canvas_for_step(rng, step, args.steps, args.stage1_frac)
        n_seq = max(2, args.tokens_per_step // (gen_length + 2 * args.n_steps + 3))
        ramp = min(1.0, step / (args.mask_warmup * args.steps)) if args.mask_warmup > 0 else 1.0
        x, y, w = make_batch(rng, n_seq, gen_length, args.n_steps, seed=args.seed * 1_000_003 + step,
                             pad_weight=args.pad_weight, t_max=0.15 + 0.85 * ramp, suffix_prob=0.5 * ramp)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(x)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
        loss = (ce * w.reshape(-1)).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        minutes = (time.time() - start) / 60
        if step % 50 == 0:
            print(f"step {step} canvas {gen_length} loss {ema:.4f} lr {lr_at(step):.2e} {minutes:.1f} min", flush=True)
        if args.eval_every and step and step % args.eval_every == 0:
            acc = accuracy(model, 40, 32, args.n_steps, seed=10_000 + step)
            print(f"step {step} eval acc (gen 32, 40 problems) {acc:.3f}", flush=True)
            model.save_pretrained(args.out)
        if args.stop_after is not None and step + 1 >= args.stop_after:
            print(f"stopping after step {step} (--stop-after)", flush=True)
            break
        if minutes > args.max_minutes:
            print(f"stopping at step {step}: {minutes:.1f} min > --max-minutes", flush=True)
            break
    model.eval()
    model.save_pretrained(args.out)
    for g in (32, 256) if args.final_eval else ():
        print(f"final acc gen {g}: {accuracy(model, args.final_eval, g, args.n_steps, seed=99):.3f}", flush=True)


if __name__ == "__main__":
    main()
