"""Plots of ``run_grid`` results (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["plot_results"]


def plot_results(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Draw ``score_vs_budget.png`` and ``memory_latency_vs_context.png``; return the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    rows = result["rows"]
    written: list[Path] = []

    # 1. Score vs budget, one panel per (model, benchmark), one line per policy, full KV dashed.
    panels = sorted({(r["model"], r["benchmark"]) for r in rows})
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
        for ax, (model, bench) in zip(axes[0], panels, strict=True):
            sel = [r for r in rows if r["model"] == model and r["benchmark"] == bench]
            metric = sel[0]["metric"]
            by_policy: dict[str, list[tuple[int, float]]] = defaultdict(list)
            for r in sel:
                if r["budget"] is None:
                    ax.axhline(r[metric], color="black", linestyle="--", label="full KV")
                else:
                    by_policy[r["policy"]].append((r["budget"], r[metric]))
            for policy, pts in sorted(by_policy.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
            if by_policy:
                ax.set_xscale("log", base=2)
            ax.set_xlabel("KV budget (slots per layer)")
            ax.set_ylabel(metric)
            ax.set_title(f"{model}: {bench}", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "score_vs_budget.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # 2. KV memory and decode latency vs context length, one line per (model, policy, budget).
    series: dict[str, dict[int, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        label = f"{r['model']} {r['policy']}" + ("" if r["budget"] is None else f"@{r['budget']}")
        for s in r["samples"]:
            series[label][s["context_tokens"]].append((s["kv_bytes"] / 2**20, s["decode_ms_per_token"]))
    if series:
        fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(10, 3.8))
        for label, by_len in sorted(series.items()):
            xs = sorted(by_len)
            mem = [sum(v[0] for v in by_len[x]) / len(by_len[x]) for x in xs]
            lat = [sum(v[1] for v in by_len[x]) / len(by_len[x]) for x in xs]
            ax_m.plot(xs, mem, marker=".", label=label)
            ax_t.plot(xs, lat, marker=".", label=label)
        ax_m.set_xlabel("context tokens")
        ax_m.set_ylabel("KV cache after prefill (MiB)")
        ax_t.set_xlabel("context tokens")
        ax_t.set_ylabel("decode ms / token")
        ax_m.legend(fontsize=7)
        fig.tight_layout()
        path = out / "memory_latency_vs_context.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
