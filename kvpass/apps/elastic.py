"""Elastic-Cache generation for diffusion LMs: runs the graphs :class:`RefreshDLLMKV` produces.

Each denoising step (Nguyen-Tri et al., 2025, Algorithm 1):

1. the rows run are the tracked tokens, the tokens committed last step and a sliding window of the
   ``window`` leftmost masked positions; every other position — masked ones outside the window
   included ("block caching") — keeps its cached keys/values;
2. layer by layer, ``kvpass::elastic_attend`` writes the rows into the layer's caches and returns
   the drift statistic: the tracked tokens' attention probabilities before vs after, compared as the
   reference implementation does (``drift="heads"``: ``F.cosine_similarity(past, now, dim=1).mean()``
   in ``LLaDABlock.attention``, the cosine across the heads axis for every (tracked token, key),
   averaged over tracked tokens and keys); the first layer ``l`` where it falls below ``gamma``
   starts a refresh: every position is recomputed from layer ``l+1`` on while layers ``<= l`` keep
   their caches;
3. the window's predictions above ``threshold`` (at least the most confident) are committed, and
   each layer's next tracked token is the decoded position the window attended to most.

The refresh needs layer ``l+1``'s input for every position. As the reference implementation does
(``boundary="cached"``, the default), it gets the input cached for every position (at the last
refresh, or the last step that ran the position), with this step's rows overwritten by their fresh
hidden states from layer ``l``.

Departures from the reference, kept as named options (README, BENCHMARKS.md: "Faithful drift test
and boundary (issue 19)"):

* ``drift="keys"``: kvpass's earlier drift statistic, the cosine across the keys (each head's
  attention row) per (head, tracked token), averaged over heads and tracked tokens. The same
  ``gamma`` then means a different refresh rate.
* ``boundary="fresh"``: layer ``l`` is also evaluated on every position from its cached inputs — its
  keys/values for the non-step rows come out equal to the cached ones, so layers ``<= l`` still keep
  their caches — which makes layer ``l+1``'s inputs current. With ``gamma`` above 1 every step then
  refreshes from layer 0 on and the tokens equal no-cache decoding exactly.

With ``compile=...`` shapes are static per canvas (step rows padded to ``L * track_num + 2 * window``
with copies of a real row, tracked and window slots padded with zero weight), so each layer graph
compiles twice (step rows, all rows) and never again; run eagerly, the graphs take the exact rows.
Batch size 1, like the reference implementation.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.fx as fx

from kvpass.models.llada_generate import commit_confident, masked_canvas
from kvpass.passes.refresh_dllm_kv import DRIFT_STATISTICS, ElasticProgram, RefreshDLLMKV

# the reference's rule first: "cached" boundary, "heads" drift statistic; the others are departures
BOUNDARIES = ("cached", "fresh")
DRIFTS = DRIFT_STATISTICS


@dataclasses.dataclass(frozen=True)
class ElasticConfig:
    """Defaults as the paper and its reference code: window 16, gamma 0.9, confidence threshold 0.9, one tracked
    token per layer, the drift test's cosine across heads (``drift="heads"``) and the refresh from layer ``l+1``
    on cached inputs (``boundary="cached"``). ``drift="keys"`` and ``boundary="fresh"`` are kvpass departures."""

    window: int = 16
    gamma: float = 0.9
    threshold: float | None = 0.9   # None: commit the tokens_per_step most confident window positions
    tokens_per_step: int = 1
    track_num: int = 1
    drift: str = "heads"            # "heads": the reference's drift statistic; "keys": kvpass's earlier one
    boundary: str = "cached"        # "cached": the reference's refresh boundary; "fresh": recompute layer l too
    compile: str | None = None      # a torch.compile backend for the layer graphs, or None (run the graphs)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window={self.window} must be >= 1")
        if self.track_num < 1:
            raise ValueError(f"track_num={self.track_num} must be >= 1")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold} must be in (0, 1] or None")
        if self.tokens_per_step < 1:
            raise ValueError(f"tokens_per_step={self.tokens_per_step} must be >= 1")
        if self.boundary not in BOUNDARIES:
            raise ValueError(f"boundary={self.boundary!r}; valid: {BOUNDARIES}")
        if self.drift not in DRIFTS:
            raise ValueError(f"drift={self.drift!r}; valid: {DRIFTS}")


@dataclasses.dataclass
class ElasticResult:
    tokens: torch.Tensor                 # [1, prompt + gen_length]
    nfe: int                             # denoising steps (one forward each)
    token_layers: int                    # rows x layers computed, step rows padding included
    refresh_from: list[int | None]       # per step: first layer recomputed for all positions (None: none)
    step_rows: list[int]                 # per step: rows run through the reused layers (padding included)
    seconds: float


def export_dllm(model: torch.nn.Module, example_length: int = 64) -> fx.GraphModule:
    """``torch.export`` the model's ``(input_ids, position_ids) -> logits`` with a dynamic length."""
    ids = torch.zeros(1, example_length, dtype=torch.long)
    pos = torch.arange(example_length)[None]
    length = torch.export.Dim("length", min=2, max=1 << 16)
    ep = torch.export.export(model, (ids, pos), dynamic_shapes=({1: length}, {1: length}))
    return ep.module()


class ElasticCacheGenerator:
    """Export ``model`` once, rewrite it with :class:`RefreshDLLMKV`, generate with Elastic-Cache."""

    def __init__(self, model: torch.nn.Module, config: ElasticConfig | None = None) -> None:
        self.model = model
        self.config = config or ElasticConfig()
        self.refresh_pass = RefreshDLLMKV()
        self.program: ElasticProgram = self.refresh_pass(export_dllm(model))
        self.n_layers = len(self.program.layers)
        run = self.program.layers
        if self.config.compile is not None:
            # one compiled callable per (layer, row count): static shapes, no recompiles while decoding
            self._compiled: dict[tuple[int, int], object] = {}
        self._run_layers = run

    # ------------------------------------------------------------------------------------------
    def _layer(self, i: int, n_rows: int):
        if self.config.compile is None:
            return self._run_layers[i]
        key = (i, n_rows)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(self._run_layers[i], backend=self.config.compile, dynamic=False,
                                                fullgraph=True)
        return self._compiled[key]

    @staticmethod
    def _args(spec: list[tuple], inputs: tuple, pro: tuple, hidden: torch.Tensor | None) -> list:
        out = []
        for s in spec:
            kind = s[0]
            out.append(inputs[s[1]] if kind == "input" else pro if kind == "prologue" and s[1] is None
                       else pro[s[1]] if kind == "prologue" else s[1] if kind == "const" else hidden)
        return out

    def _prologue(self, ids: torch.Tensor, pos: torch.Tensor) -> tuple:
        inputs = (ids, pos)
        pro = self.program.prologue(*self._args(self.program.prologue_args, inputs, (), None))
        return pro if isinstance(pro, tuple) else (pro,)

    def _epilogue(self, inputs: tuple, pro: tuple, hidden: torch.Tensor) -> torch.Tensor:
        return self.program.epilogue(*self._args(self.program.epilogue_args, inputs, pro, hidden))

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, gen_length: int) -> ElasticResult:
        if prompt.dim() != 2 or prompt.shape[0] != 1:
            raise ValueError(f"Elastic-Cache decodes one prompt [1, length], got shape {tuple(prompt.shape)}")
        if gen_length < 1:
            raise ValueError(f"gen_length={gen_length} must be >= 1")
        cfg, mcfg, prog = self.config, self.model.config, self.program
        start = time.perf_counter()
        n_layers, w = self.n_layers, cfg.window
        plen = prompt.shape[1]
        n = plen + gen_length
        x = masked_canvas(prompt, gen_length, mcfg.mask_token_id)
        all_pos = torch.arange(n)
        masked = torch.arange(plen, n)
        n_track = n_layers * cfg.track_num
        stat = DRIFTS.index(cfg.drift)      # which of kvpass::elastic_attend's drift statistics gamma tests
        q_rows = n_track + 2 * w
        static = cfg.compile is not None

        def size(k: int) -> int | None:   # pad to static sizes only when the layer graphs are compiled
            return k if static else None

        full_inputs = (x, all_pos[None])
        full_pro = self._prologue(*full_inputs)
        h0 = full_pro[prog.hidden_from_prologue]
        hd = (1, prog.n_heads, n, prog.head_dim)
        kc = [h0.new_zeros(hd) for _ in range(n_layers)]
        vc = [h0.new_zeros(hd) for _ in range(n_layers)]
        qc = [h0.new_zeros(hd) for _ in range(n_layers)]
        xc = [h0.new_zeros(h0.shape) for _ in range(n_layers)]

        track = torch.zeros(0, dtype=torch.long)
        new_rows = torch.arange(plen)
        token_layers, refresh_from, step_rows, nfe = 0, [], [], 0
        eos_seen = False
        while masked.numel():
            win = masked[:w]
            excluded = torch.zeros(n, dtype=torch.bool)
            excluded[masked] = True
            t_pad, t_weight = _pad(track if track.numel() else win[:1], size(n_track), len(track))
            full_win, full_ww = _pad(win, size(w), len(win))
            if nfe == 0:
                first_full, rows, pro, h = 0, all_pos, full_pro, h0
                win_idx, win_w = full_win, full_ww
            else:
                first_full = None
                real = torch.cat([track, new_rows, win])
                rows, _ = _pad(real, size(q_rows), len(real))
                win_idx, win_w = _pad(torch.arange(len(track) + len(new_rows), len(real)), size(w), len(win))
                pro = self._prologue(x[:, rows], rows[None])
                h = pro[prog.hidden_from_prologue]
            scores = [None] * n_layers
            layer = 0
            while layer < n_layers:
                if first_full is None:      # step rows over cached keys/values, then the drift test
                    out = self._call(layer, (x[:, rows], rows[None]), pro, h, rows, kc, vc, qc, xc, t_pad, t_weight,
                                     win_idx, win_w, excluded)
                    h, sim, scores[layer] = out
                    token_layers += len(rows)
                    if float(sim[stat]) < cfg.gamma:
                        if cfg.boundary == "fresh":
                            first_full, h = layer, xc[layer]     # redo this layer on every position
                        else:
                            first_full = layer + 1
                            if layer + 1 < n_layers:
                                h = xc[layer + 1].index_copy(1, rows, h)
                            layer += 1
                        continue
                else:                       # refresh: every position from here on
                    out = self._call(layer, full_inputs, full_pro, h, all_pos, kc, vc, qc, xc, t_pad, t_weight,
                                     full_win, full_ww, excluded)
                    h, _, scores[layer] = out
                    token_layers += n
                layer += 1
            refresh_from.append(first_full if nfe else 0)
            step_rows.append(len(rows))
            if first_full is not None and first_full < n_layers:
                logits = self._epilogue(full_inputs, full_pro, h)[:, win]
            elif first_full is not None:    # boundary="cached" failing at the last layer: rows are in h
                logits = self._epilogue((x[:, rows], rows[None]), pro, h)[:, win_idx[: len(win)]]
            else:
                logits = self._epilogue((x[:, rows], rows[None]), pro, h)[:, win_idx[: len(win)]]
            nfe += 1
            # next tracked tokens: each layer's most-attended decoded position
            track = torch.cat([s.topk(cfg.track_num).indices for s in scores if s is not None]).unique()
            track = track[~excluded[track]]
            committed, eos = commit_confident(logits, win, x, cfg.threshold, mcfg.eos_token_id, cfg.tokens_per_step)
            masked = masked[~torch.isin(masked, committed)]
            new_rows = committed
            if not eos_seen and eos.numel():
                eos_seen = True
                masked = masked[masked <= eos.min()]
        return ElasticResult(x, nfe, token_layers, refresh_from, step_rows, time.perf_counter() - start)

    def _call(self, layer: int, inputs: tuple, pro: tuple, h: torch.Tensor, rows: torch.Tensor, kc, vc, qc, xc,
              track, track_w, win_idx, win_w, excluded):
        args = self._args(self.program.layer_args[layer], inputs, pro, h)
        fn = self._layer(layer, len(rows))
        h, kc[layer], vc[layer], qc[layer], xc[layer], sim, score = fn(
            *args, rows, kc[layer], vc[layer], qc[layer], xc[layer], track, track_w, win_idx, win_w, excluded)
        return h, sim, score


def _pad(values: torch.Tensor, size: int | None, n_real: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` padded to ``size`` (None: not padded) by repeating its last entry, and weights (1 real, 0 padding)."""
    size = len(values) if size is None else size
    if len(values) > size:
        raise ValueError(f"{len(values)} rows do not fit the static row budget {size}")
    out = torch.cat([values, values[-1:].expand(size - len(values))])
    weight = torch.zeros(size)
    weight[:n_real] = 1.0
    return out, weight
