"""The launch tables of the decode kernels are pure functions of shapes (a captured CUDA graph
keeps what it was captured with, and every rank must pick the same): which entry a shape takes,
and that the split-K plan of every entry covers the cache exactly once."""
from __future__ import annotations

import pytest

from megatron_ext.layers.attention import cp_decode
from megatron_ext.layers.moe import decode_experts as de


@pytest.mark.parametrize("rows,num_local,block_m", [
    (64 * 8, 128, 16),     # a: 64 tokens over 128 half-width experts, 4 rows each on average
    (128 * 8, 128, 16),    # 8 rows each: still one 16-row chunk for nearly every expert
    (192 * 8, 128, 32),
    (256 * 8, 128, 32),    # 16 rows each: 16-row chunks would read weights ~1.5 times
    (256 * 8, 64, 32),     # moe_ep 2: the fixed-size dispatch counts every rank's rows
    (1, 1, 16),
])
def test_expert_chunk_rows_follow_rows_per_expert(rows, num_local, block_m):
    assert de.block_rows(rows, num_local) == block_m
    for table in (de.GATE_UP_CONFIGS, de.DOWN_CONFIGS):
        tabled = de.launch_config(table, 384, 2048, rows, num_local)
        assert tabled.block_m == block_m and tabled == table[(384, 2048, block_m)]
        unknown = de.launch_config(table, 40, 72, rows, num_local)   # no sweep saw this shape
        assert unknown == de.default_config(block_m)


def test_every_tabled_expert_config_matches_its_key():
    for table in (de.GATE_UP_CONFIGS, de.DOWN_CONFIGS):
        for (inter, hidden, block_m), config in table.items():
            assert config.block_m == block_m and block_m in (16, 32)
            assert all(v > 0 for v in config)


@pytest.mark.parametrize("rows,kv_heads,slots,entry", [
    (1, 4, 577, 4), (16, 4, 577, 4), (16, 4, 4160, 4),    # few rows: shorter splits
    (64, 4, 577, 3), (64, 4, 4160, 3),                     # the session-4 settings
    (128, 4, 577, 2), (128, 4, 4160, 2),
    (256, 4, 577, 0),                                      # a big batch, short cache
    (256, 4, 4160, 1), (512, 4, 2049, 1),
])
def test_decode_attention_launch_entry(rows, kv_heads, slots, entry):
    assert cp_decode.decode_launch(rows, kv_heads, slots) is cp_decode.DECODE_LAUNCHES[entry][2]


@pytest.mark.parametrize("rows", [1, 16, 64, 128, 256, 512])
@pytest.mark.parametrize("slots", [1, 31, 577, 4160, 65600])
def test_split_plan_of_every_entry_covers_the_cache_once(rows, slots):
    cfg = cp_decode.decode_launch(rows, 4, slots)
    splits, split_len = cp_decode.split_plan(rows, 4, slots, 132, cfg["block_n"],
                                             cfg["min_split"], cfg["programs_per_sm"])
    assert split_len % cfg["block_n"] == 0 and splits >= 1
    assert (splits - 1) * split_len < slots <= splits * split_len
