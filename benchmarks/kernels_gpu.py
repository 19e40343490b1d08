"""GPU benchmarks of the fused kernels (issue: fused Triton kernels). Needs a CUDA GPU; prints figures.

1. fused attention + per-key scores (``attend_scores``, SnapKV-style observation window) vs PyTorch's
   flash SDPA (no scores) vs eager attention that materializes the weights, at 8K-32K keys;
2. decode: one attention + scores + compaction step over a 2K-slot store vs plain SDPA over the full
   32K cache (tokens/s of the attention part of a layer);
3. tuned vs default launch configs (reads the ``kvpass tune`` cache; run ``kvpass tune`` first);
4. Elastic-Cache layer attention with its drift test (``elastic_drift``: attention of the step rows,
   tracked tokens' before/after cosine and window scores, no query×key matrix) vs the op's eager
   reference (``kvpass.ops.dllm.elastic_attend_reference``, which materializes the tracked and window
   rows' attention) at LLaDA-8B-like shapes (MHA, ``--heads`` × ``--head-dim``), for a denoising step
   (``--step-rows`` rows) and a refresh (every canvas row);
5. SnapKV's prefill scores (``snapkv_scores``: pooling, GQA mean and recent protection in one kernel) vs
   the policy's eager code (``kvpass::score``'s reference) at 8K-32K slots.

    python benchmarks/kernels_gpu.py [--heads 32 --kv-heads 8 --head-dim 128 --dtype bfloat16] [--only 4]
"""

# ruff: noqa: B023  (each lambda is benchmarked right where it is made, inside its loop iteration)
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from kvpass.validate import positive_int


def bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100))


def eager_with_scores(q, k, v, scale, n_obs):
    """The eager baseline score-based policies use today: materialize softmax(QK^T), then sum the window."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    t, n = q.shape[2], k.shape[2]
    logits = (q @ k.transpose(-1, -2)).float() * scale
    causal = torch.ones(t, n, dtype=torch.bool, device=q.device).tril(n - t)
    w = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    return (w.to(v.dtype) @ v), w[:, :, t - n_obs :].sum(2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=positive_int, default=32)
    p.add_argument("--kv-heads", type=positive_int, default=8)
    p.add_argument("--head-dim", type=positive_int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    p.add_argument("--block", type=positive_int, default=512, help="queries per prefill block")
    p.add_argument("--obs", type=positive_int, default=32, help="observation window (SnapKV)")
    p.add_argument("--budget", type=positive_int, default=2048)
    p.add_argument("--step-rows", type=positive_int, default=64,
                   help="Elastic-Cache rows per denoising step (32 tracked tokens + committed + window 16, padded)")
    p.add_argument("--only", type=int, choices=[1, 2, 3, 4, 5], action="append", help="run only these sections")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels_gpu.py: needs a CUDA GPU (torch.cuda.is_available() is False); "
              "on CPU use `kvpass tune --smoke` and the interpreter tests instead", file=sys.stderr)
        return 2
    from kvpass.kernels import attend_scores as A
    from kvpass.kernels import compact as C
    from kvpass.kernels import tuning

    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    scale = d**-0.5
    print(f"device: {torch.cuda.get_device_name(dev)}; torch {torch.__version__}; heads {hq}/{hkv}, head dim {d}, "
          f"{args.dtype}")

    sections = set(args.only or (1, 2, 3, 4, 5))
    if 1 in sections:
        prefill(args, A, dev, dtype, hq, hkv, d, scale)
    if 2 in sections:
        decode(args, A, C, dev, dtype, hq, hkv, d, scale)
    if 3 in sections:
        tuned_vs_default(args, A, tuning, dev, dtype, hq, hkv, d, scale)
    if 4 in sections:
        elastic(args, dev, dtype, hq, d)
    if 5 in sections:
        snapkv(args, dev, hq, hkv)
    return 0


def prefill(args, A, dev, dtype, hq, hkv, d, scale) -> None:
    print(f"\n[1] prefill block of {args.block} queries over N keys, obs window {args.obs} (ms)")
    print(f"{'N':>7} {'fused attn+scores':>18} {'flash SDPA':>11} {'eager+scores':>13} {'fused/SDPA':>11} "
          f"{'eager/fused':>12}")
    for n in (8192, 16384, 32768):
        q = torch.randn(1, hq, args.block, d, device=dev, dtype=dtype)
        k, v = (torch.randn(1, hkv, n, d, device=dev, dtype=dtype) for _ in range(2))
        pos = torch.arange(n, device=dev).expand(1, hkv, n).contiguous()
        fused = bench(lambda: A.attend_scores(q, k, v, pos, scale, args.obs))
        # flash SDPA without a mask (SDPA's is_causal is top-left aligned): every query sees all N keys, a
        # little more work than the block's bottom-right causal mask (T x T / 2 of T x N), so SDPA is favoured
        sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True))
        try:
            eager = bench(lambda: eager_with_scores(q, k, v, scale, args.obs))
        except torch.OutOfMemoryError:
            eager = float("nan")
        print(f"{n:>7} {fused:>18.3f} {sdpa:>11.3f} {eager:>13.3f} {fused / sdpa:>11.2f} {eager / fused:>12.2f}")


def decode(args, A, C, dev, dtype, hq, hkv, d, scale) -> None:
    print(f"\n[2] decode step: compressed store ({args.budget} slots) vs full cache (32768), per layer")
    n_full = 32768
    q = torch.randn(1, hq, 1, d, device=dev, dtype=dtype)
    kf, vf = (torch.randn(1, hkv, n_full, d, device=dev, dtype=dtype) for _ in range(2))
    n = args.budget + 1
    k, v = kf[:, :, :n].contiguous(), vf[:, :, :n].contiguous()
    pos = torch.arange(n, device=dev).expand(1, hkv, n).contiguous()
    keep, acc = torch.rand(1, hkv, n, device=dev), torch.zeros(1, hkv, n, device=dev)

    def compressed_step():
        A.attend_scores(q, k, v, pos, scale, 1)
        C.compact(k, v, pos, keep, acc, args.budget, args.budget)

    full = bench(lambda: F.scaled_dot_product_attention(q, kf, vf, scale=scale, enable_gqa=True))
    comp = bench(compressed_step)
    print(f"full-cache SDPA {full * 1000:.1f} us ({1000 / full:.0f} steps/s); kvpass attend+scores+compact "
          f"{comp * 1000:.1f} us ({1000 / comp:.0f} steps/s); speedup {full / comp:.2f}x")


def tuned_vs_default(args, A, tuning, dev, dtype, hq, hkv, d, scale) -> None:
    print("\n[3] tuned vs default configs (tune cache: " + str(tuning.cache_path()) + ")")
    for t, n in ((args.block, args.budget + args.block), (1, args.budget + 1)):
        q = torch.randn(1, hq, t, d, device=dev, dtype=dtype)
        k, v = (torch.randn(1, hkv, n, d, device=dev, dtype=dtype) for _ in range(2))
        pos = torch.arange(n, device=dev).expand(1, hkv, n).contiguous()
        tuned = tuning.lookup(A.KERNEL, A.shape_bucket(q, k, min(t, args.obs)), dev)
        default = A.default_config(1, hkv, hq // hkv, t, n, d)
        ms_d = bench(lambda: A.attend_scores(q, k, v, pos, scale, min(t, args.obs), config=default))
        if tuned is None:
            print(f"T={t:<4} N={n:<6} default {ms_d:.3f} ms; no tuned entry (run `kvpass tune --heads {hq} "
                  f"--kv-heads {hkv} --head-dim {d} --budget {args.budget} --block {args.block}`)")
            continue
        ms_t = bench(lambda: A.attend_scores(q, k, v, pos, scale, min(t, args.obs), config=tuned))
        print(f"T={t:<4} N={n:<6} default {ms_d:.3f} ms, tuned {ms_t:.3f} ms ({ms_d / ms_t:.2f}x) {tuned}")


def elastic(args, dev, dtype, h, d) -> None:
    from kvpass.kernels import elastic_drift as E

    from kvpass.ops.dllm import elastic_attend_reference

    print(f"\n[4] Elastic-Cache layer attention + drift test, MHA {h} heads x {d}, 32 tracked tokens, window 16 (ms)")
    print(f"{'canvas':>7} {'rows':>5} {'fused':>8} {'eager ref':>10} {'ref/fused':>10} {'max |d sim|':>12} "
          f"{'max |d score|':>14}")
    gen = torch.Generator(device="cpu").manual_seed(0)
    for n in (512, 1024, 2048, 4096):
        for rows in (min(args.step_rows, n), n):
            r = torch.randperm(n, generator=gen).to(dev)[:rows]
            q, k, v = (torch.randn(1, h, rows, d, device=dev, dtype=dtype) for _ in range(3))
            kc, vc, qc = (torch.randn(1, h, n, d, device=dev, dtype=dtype) for _ in range(3))
            track, window = r[:32], torch.arange(min(rows, 16), device=dev)
            excluded = torch.arange(n, device=dev) >= n // 2
            inputs = (q, k, v, r, kc, vc, qc, track, torch.ones(len(track), device=dev), window,
                      torch.ones(len(window), device=dev), excluded)
            got, ref = E.elastic_attend(*inputs), elastic_attend_reference(*inputs)
            d_sim = float((got[4].float() - ref[4].float()).abs().max())  # both drift statistics
            d_score = float((got[5].float() - ref[5].float()).abs().max())
            fused = bench(lambda: E.elastic_attend(*inputs))
            eager = bench(lambda: elastic_attend_reference(*inputs))
            print(f"{n:>7} {rows:>5} {fused:>8.3f} {eager:>10.3f} {eager / fused:>10.2f} {d_sim:>12.2e} "
                  f"{d_score:>14.2e}")


if __name__ == "__main__":
    raise SystemExit(main())


def snapkv(args, dev, hq, hkv) -> None:
    from kvpass.kernels import snapkv_scores as S

    from kvpass.ops import score_reference
    from kvpass.policies import make_policy

    rule = make_policy("snapkv", window=args.obs)
    print(f"\n[5] SnapKV prefill scores, {hq}/{hkv} heads, window {args.obs}, kernel 5 avg (ms)")
    print(f"{'N':>7} {'kernel':>8} {'eager':>8} {'eager/kernel':>13} {'max |d acc|':>12}")
    for n in (8192, 16384, 32768):
        obs = torch.rand(1, hq, n, device=dev) * args.obs
        pos = torch.arange(n, device=dev).expand(1, hkv, n).contiguous()
        keys, acc = torch.empty(1, hkv, n, 1, device=dev), torch.zeros(1, hkv, n, device=dev)
        got = S.snapkv_scores(obs, pos, args.obs, args.obs, 5, "avg")
        ref = score_reference(rule.spec(), obs, keys, pos, acc, n, args.budget)
        diff = float((got[1] - ref[1]).abs().max())
        kernel = bench(lambda: S.snapkv_scores(obs, pos, args.obs, args.obs, 5, "avg"))
        eager = bench(lambda: score_reference(rule.spec(), obs, keys, pos, acc, n, args.budget))
        print(f"{n:>7} {kernel:>8.3f} {eager:>8.3f} {eager / kernel:>13.2f} {diff:>12.2e}")
