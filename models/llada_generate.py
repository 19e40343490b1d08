"""Generation for :class:`models.llada.LLaDAModelLM` (masked diffusion decoding).

* :func:`generate_llada` — LLaDA's semi-autoregressive block decoding: the canvas after the prompt
  is split into blocks decoded left to right; within a block each step runs the whole sequence
  (no cache) and unmasks the ``k`` most confident predictions (low-confidence remasking, ``k``
  from an even split of the block's masks over its steps) or, with ``threshold``, every
  prediction above it and at least the most confident one (Fast-dLLM's confidence-aware
  parallel decoding).
* :func:`generate_dual_cache` — Fast-dLLM's dual cache: at each block boundary one full forward
  fills every layer's KV cache; the block's later steps run only the block's rows and reuse the
  cached prefix *and* suffix keys/values.
* :func:`generate_window` — the sliding-window rule Elastic-Cache decodes with, run without any
  cache: each step predicts the ``window`` leftmost masked positions, commits those above
  ``threshold`` (at least the most confident) and stops at the first committed ``<eos>``.

Every function returns a :class:`GenerationResult` with the work done in (token x layer) units.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .llada import LLaDAModelLM


@dataclasses.dataclass
class GenerationResult:
    tokens: torch.Tensor          # [B, prompt + gen_length]
    nfe: int                      # forward passes (network function evaluations)
    token_layers: int             # rows x layers computed (the recomputation count)
    steps: int                    # decoding steps


def _check(prompt: torch.Tensor, gen_length: int, block_length: int) -> None:
    if prompt.dim() != 2:
        raise ValueError(f"prompt must be [batch, length], got shape {tuple(prompt.shape)}")
    if gen_length <= 0 or block_length <= 0 or gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} must be a positive multiple of block_length={block_length}")


def masked_canvas(prompt: torch.Tensor, gen_length: int, mask_token_id: int) -> torch.Tensor:
    """``[B, prompt + gen_length]``: the prompt followed by ``gen_length`` mask tokens."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_token_id, dtype=torch.long,
                   device=prompt.device)
    x[:, : prompt.shape[1]] = prompt
    return x


def _block_schedule(prompt: torch.Tensor, gen_length: int, block_length: int, steps: int | None,
                    threshold: float | None) -> tuple[int, int]:
    """Validate a block decoding's settings; return ``(blocks, steps)``."""
    _check(prompt, gen_length, block_length)
    n_blocks = gen_length // block_length
    steps = gen_length if steps is None else steps
    if threshold is None and (steps <= 0 or steps % n_blocks):
        raise ValueError(f"steps={steps} must be a positive multiple of the number of blocks ({n_blocks})")
    return n_blocks, steps


def num_transfer_tokens(block_masks: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's schedule: split each row's masked count evenly over ``steps`` (remainder first)."""
    count = block_masks.sum(dim=1, keepdim=True)
    base, rem = count // steps, count % steps
    out = base.expand(-1, steps).clone()
    cols = torch.arange(steps, device=block_masks.device)[None]
    return out + (cols < rem).long()


def select_transfer(logits: torch.Tensor, x: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor | None,
                    threshold: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy predictions and which candidate positions to unmask (low-confidence remasking).

    ``logits [B, T, V]``, ``x``/``candidates [B, T]``; either ``k [B]`` (top-k by confidence) or
    ``threshold`` (all above it, and always the most confident candidate).
    """
    p = F.softmax(logits.to(torch.float64), dim=-1)
    conf, x0 = p.max(dim=-1)
    x0 = torch.where(candidates, x0, x)
    conf = torch.where(candidates, conf, torch.full_like(conf, -1.0))
    transfer = torch.zeros_like(candidates)
    for b in range(x.shape[0]):
        n_cand = int(candidates[b].sum())
        if n_cand == 0:
            continue
        if threshold is not None:
            top = int(conf[b].argmax())
            transfer[b] = candidates[b] & (conf[b] > threshold)
            transfer[b, top] = True
        else:
            kb = min(int(k[b]), n_cand)
            if kb > 0:
                transfer[b, conf[b].topk(kb).indices] = True
    return x0, transfer


@torch.no_grad()
def generate_llada(model: LLaDAModelLM, prompt: torch.Tensor, gen_length: int = 256, block_length: int = 32,
                   steps: int | None = None, threshold: float | None = None) -> GenerationResult:
    """No-cache block decoding; ``steps`` (default ``gen_length``) or ``threshold`` decides how many to unmask."""
    n_blocks, steps = _block_schedule(prompt, gen_length, block_length, steps, threshold)
    cfg = model.config
    plen = prompt.shape[1]
    x = masked_canvas(prompt, gen_length, cfg.mask_token_id)
    n, layers, nfe, total_steps = x.shape[1], cfg.num_hidden_layers, 0, 0
    for blk in range(n_blocks):
        lo, hi = plen + blk * block_length, plen + (blk + 1) * block_length
        schedule = None if threshold is not None else num_transfer_tokens(x[:, lo:hi] == cfg.mask_token_id,
                                                                          steps // n_blocks)
        i = 0
        while True:
            in_block = torch.zeros_like(x, dtype=torch.bool)
            in_block[:, lo:hi] = True
            candidates = (x == cfg.mask_token_id) & in_block
            if not candidates.any() or (schedule is not None and i >= schedule.shape[1]):
                break
            logits = model(x)
            nfe += 1
            x0, transfer = select_transfer(logits, x, candidates, None if schedule is None else schedule[:, i],
                                           threshold)
            x = torch.where(transfer, x0, x)
            i += 1
            total_steps += 1
    return GenerationResult(x, nfe, nfe * n * layers, total_steps)


@torch.no_grad()
def generate_dual_cache(model: LLaDAModelLM, prompt: torch.Tensor, gen_length: int = 256, block_length: int = 32,
                        steps: int | None = None, threshold: float | None = 0.9) -> GenerationResult:
    """Fast-dLLM dual cache: a full forward per block refreshes every KV; in-block steps run the block only."""
    n_blocks, steps = _block_schedule(prompt, gen_length, block_length, steps, threshold)
    cfg = model.config
    b, plen = prompt.shape
    x = masked_canvas(prompt, gen_length, cfg.mask_token_id)
    n, layers = x.shape[1], cfg.num_hidden_layers
    all_pos = torch.arange(n, device=x.device)
    cache = model.new_kv_cache(b, n)
    nfe = token_layers = total_steps = 0
    for blk in range(n_blocks):
        lo, hi = plen + blk * block_length, plen + (blk + 1) * block_length
        schedule = None if threshold is not None else num_transfer_tokens(x[:, lo:hi] == cfg.mask_token_id,
                                                                          steps // n_blocks)
        i = 0
        while True:
            candidates = x[:, lo:hi] == cfg.mask_token_id
            if not candidates.any() or (schedule is not None and i >= schedule.shape[1]):
                break
            if i == 0:   # block boundary: refresh every layer's cache with a full forward
                logits = model(x, all_pos[None].expand(b, -1), cache, all_pos)[:, lo:hi]
                token_layers += n * layers
            else:
                pos = all_pos[lo:hi]
                logits = model(x[:, lo:hi], pos[None].expand(b, -1), cache, pos)
                token_layers += (hi - lo) * layers
            nfe += 1
            x0, transfer = select_transfer(logits, x[:, lo:hi], candidates,
                                           None if schedule is None else schedule[:, i], threshold)
            x[:, lo:hi] = torch.where(transfer, x0, x[:, lo:hi])
            i += 1
            total_steps += 1
    return GenerationResult(x, nfe, token_layers, total_steps)


def commit_confident(logits: torch.Tensor, window: torch.Tensor, x: torch.Tensor, threshold: float | None,
                     eos_id: int, tokens_per_step: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Elastic-Cache's commit rule for batch 1: unmask window positions whose top probability is at least
    ``min(threshold, best)`` (so at least one), or with ``threshold=None`` the ``tokens_per_step`` most
    confident ones. ``logits [1, W, V]``, ``window [W]`` canvas positions.

    Returns the committed positions and, among them, those that got ``<eos>``.
    """
    p = F.softmax(logits[0].to(torch.float64), dim=-1)
    conf, pred = p.max(dim=-1)
    if threshold is None:
        keep = torch.zeros_like(conf, dtype=torch.bool)
        keep[conf.topk(min(tokens_per_step, conf.numel())).indices] = True
    else:
        keep = conf >= min(threshold, float(conf.max()))
    committed = window[keep]
    x[0, committed] = pred[keep]
    return committed, committed[pred[keep] == eos_id]


@torch.no_grad()
def generate_window(model: LLaDAModelLM, prompt: torch.Tensor, gen_length: int = 256, window: int = 16,
                    threshold: float | None = 0.9, tokens_per_step: int = 1) -> GenerationResult:
    """No-cache reference for Elastic-Cache's decoding rule (batch 1); see :func:`commit_confident`.

    After the first committed ``<eos>`` the masks beyond it are dropped (they stay ``<mask>``).
    """
    if prompt.dim() != 2 or prompt.shape[0] != 1:
        raise ValueError(f"generate_window decodes one prompt [1, length], got shape {tuple(prompt.shape)}")
    if window <= 0 or gen_length <= 0:
        raise ValueError(f"window={window} and gen_length={gen_length} must be positive")
    cfg = model.config
    plen = prompt.shape[1]
    x = masked_canvas(prompt, gen_length, cfg.mask_token_id)
    masked = torch.arange(plen, plen + gen_length, device=x.device)
    n, layers, nfe = x.shape[1], cfg.num_hidden_layers, 0
    eos_seen = False
    while masked.numel():
        win = masked[:window]
        logits = model(x)[:, win]
        nfe += 1
        committed, eos = commit_confident(logits, win, x, threshold, cfg.eos_token_id, tokens_per_step)
        masked = masked[~torch.isin(masked, committed)]
        if not eos_seen and eos.numel():
            eos_seen = True
            masked = masked[masked <= eos.min()]
    return GenerationResult(x, nfe, nfe * n * layers, nfe)
