"""The KV cache's memory follows the tokens it holds, not slots x the whole context."""

from __future__ import annotations

import mmap

from services.inference.backends.onnxruntime import token_paged_zeros


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * mmap.PAGESIZE


def test_a_cache_buffer_commits_memory_for_the_positions_written_not_for_the_context():
    # one layer's keys for 32 slots x 3 KV heads x 2,048 positions x 64 dims: 50 MB reserved
    shape = (32, 3, 2048, 64)
    before = _resident_bytes()
    keys = token_paged_zeros(shape)
    assert keys.flags.writeable and not keys.any()
    keys[:, :, :16] = 1.0  # 16 positions in every row and head
    grown = _resident_bytes() - before
    written = 32 * 3 * 16 * 64 * 4  # 384 KiB
    # a page per row and head (16 positions of 256 bytes fill one 4 KiB page), not a huge page each
    assert grown < 4 * written, f"{grown / 2**20:.1f} MiB resident for {written / 2**20:.2f} MiB of positions"
    assert float(keys.sum()) == 32 * 3 * 16 * 64
