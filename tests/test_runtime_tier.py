"""kvpass.runtime.tier.LowerTier: appends keep what was written across growth, in host memory and in mapped files."""

from __future__ import annotations

import os

import pytest
import torch

from kvpass.apps.eval.runner import peak_rss, reset_peak_rss
from kvpass.runtime.tier import LowerTier


def _slots(seed: int, n: int, b: int = 2, h: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, 4, generator=gen), torch.randn(b, h, n, 6, generator=gen),
            torch.randint(-1, 1000, (b, h, n), generator=gen))


@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_appends_survive_growth_and_only_written_slots_count(kind, tmp_path):
    directory = str(tmp_path) if kind == "disk" else None
    first = _slots(0, 200)
    tier = LowerTier.empty(kind, directory, first[0], first[1])
    allocated = tier.k.shape[2]
    written = [first]
    tier.append(*first)
    for step in range(1, 80):  # decode-sized appends past the first allocation
        written.append(_slots(step, 1))
        tier.append(*written[-1])
    assert tier.used == 279 and tier.k.shape[2] >= 279 > allocated
    for got, want in zip((tier.k, tier.v, tier.pos), zip(*written, strict=True), strict=True):
        torch.testing.assert_close(got[:, :, :279], torch.cat(want, dim=2), rtol=0, atol=0)
    real = torch.cat([w[2] for w in written], dim=2)
    assert tier.real_tokens == int((real >= 0).sum())
    assert tier.nbytes == 2 * 3 * 279 * (4 + 6) * 4
    storage = tier.k.untyped_storage()
    if kind == "disk":  # mapped from a file of the directory, unlinked at once: nothing left behind, even after a crash
        assert os.path.dirname(storage.filename) == str(tmp_path)
        assert os.listdir(tmp_path) == []
    else:
        assert storage.filename is None


def test_append_reports_the_bytes_it_wrote_and_an_empty_append_writes_nothing():
    k, v, pos = _slots(1, 5)
    tier = LowerTier.empty("cpu", None, k, v)
    assert tier.append(k, v, pos) == k.numel() * 4 + v.numel() * 4 + pos.numel() * 8
    assert tier.append(k[:, :, :0], v[:, :, :0], pos[:, :, :0]) == 0 and tier.used == 5


@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_rows_selects_batch_rows_into_a_new_tier(kind, tmp_path):
    k, v, pos = _slots(2, 30)
    tier = LowerTier.empty(kind, str(tmp_path) if kind == "disk" else None, k, v)
    tier.append(k, v, pos)
    picked = tier.rows(lambda x: x.index_select(0, torch.tensor([1, 1, 0])))
    assert picked.used == 30 and picked.k.shape[0] == 3 and picked.kind == kind
    torch.testing.assert_close(picked.v[:, :, :30], v[[1, 1, 0]], rtol=0, atol=0)
    torch.testing.assert_close(tier.v[:, :, :30], v, rtol=0, atol=0)  # the original is untouched


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's resident set size")
def test_a_disk_tier_does_not_stay_resident_and_reads_back_what_it_wrote(tmp_path):
    """64 MiB appended to a disk tier (growing 4096 -> 32768 slots) and attended in place: the process's resident
    memory grows by far less, at its peak too (its pages go back to the file after each write, each run of a growth's
    copy and each run of attention), and nothing written is lost."""
    from kvpass.ops.tier import TIER_CHUNK, tier_attend_reference

    k = torch.randn(1, 2, 32768, 128, generator=torch.Generator().manual_seed(0))  # 32 MiB of keys, as many values
    pos = torch.arange(32768).expand(1, 2, 32768)
    tier = LowerTier.empty("disk", str(tmp_path), k[:, :, :1], k[:, :, :1], 4096)
    before = reset_peak_rss()
    for start in range(0, 32768, 4096):  # as block-wise prefills append
        tier.append(k[:, :, start:start + 4096], k[:, :, start:start + 4096], pos[:, :, start:start + 4096])
    written = peak_rss() - before
    q = torch.randn(1, 4, 1, 128)
    out, lse = tier_attend_reference(q, tier.k, tier.v, tier.pos, torch.tensor(tier.used), torch.tensor([[32768]]),
                                     0.1)
    attended = peak_rss() - before
    run_bytes = TIER_CHUNK * 2 * 128 * 4 * 2  # one run of keys and values, both heads
    assert written < 4 * run_bytes and attended < 4 * run_bytes, (written, attended)
    torch.testing.assert_close(tier.k[:, :, :32768], k, rtol=0, atol=0)  # paged back in from the file
    torch.testing.assert_close(tier.pos[:, :, :32768], pos, rtol=0, atol=0)
    from kvpass.ops.partial import attend_part_reference

    want = attend_part_reference(q, k, k, pos, torch.tensor([[32768]]), 0.1)  # in one piece, in host memory
    # (runs merged vs one sum over 32K slots: float32 sums in another order, ~1e-5 relative)
    torch.testing.assert_close(out, want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, want[1], rtol=1e-5, atol=1e-5)
