"""The split-K decode-attention kernel at the decode step's shapes: launch settings swept, with
and without the filled-length bound (``kv_len``), timed from CUDA graphs.

    python benchmarks/decode_attention.py [--rows 16 64 256] [--prompt 1024 8192] [--sweep]

Shapes: one CP rank of attn_cp 2 with Qwen3-30B-A3B attention (32 query / 4 KV heads × 128):
``prompt / 2`` cached slots per row plus room for 128 decode tokens (the cache is allocated for
the whole generation), 16 of them filled. Prints µs per call and the GB/s of the valid K/V
bytes (what a step must read) for the current settings (``decode_launch``) with and without
``kv_len``, and with ``--sweep`` the best of a grid of (block_n, num_stages, num_warps,
min_split, programs_per_sm) per shape, and per row count the best over all prompts (what one
entry of ``DECODE_LAUNCHES`` serves when it covers every prompt).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import device_name, require_cuda, table, time_graph  # noqa: E402
from megatron_ext.layers.attention.cp_decode import DECODE_LAUNCHES, triton_decode_packed  # noqa: E402

GRID = dict(block_n=(32, 64), num_stages=(2, 3), num_warps=(4,), min_split=(64, 128, 256, 512),
            programs_per_sm=(4, 8, 16))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="*", default=[16, 64, 256])
    parser.add_argument("--prompt", type=int, nargs="*", default=[1024, 8192])
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    require_cuda(__file__)
    dev = torch.device("cuda")
    hq, hkv, d, new = 32, 4, 128, 128
    rows_out, best_out = [], []
    by_rows: dict = {}            # rows → settings → µs per prompt
    current_of_rows: dict = {}    # rows → the current settings' µs per prompt
    for prompt in args.prompt:
        for b in args.rows:
            cap, filled = prompt // 2 + new // 2 + 1, prompt // 2 + 16
            q = torch.randn(b, 1, hq, d, device=dev, dtype=torch.bfloat16)
            k = torch.randn(b, hkv, cap, d, device=dev, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            valid = torch.zeros(b, cap, dtype=torch.bool, device=dev)
            valid[:, :filled] = True
            kv_len = torch.tensor(filled, device=dev)
            nbytes = 2 * b * hkv * filled * d * 2

            def run(launch=None, bound=True):
                return time_graph(lambda: triton_decode_packed(
                    q, k, v, valid, 0.088, launch=launch, kv_len=kv_len if bound else None))
            base, bounded = run(bound=False), run()
            rows_out.append([prompt, b, base, bounded, nbytes / bounded / 1e3])
            if args.sweep:
                results = []
                for values in itertools.product(*GRID.values()):
                    launch = dict(zip(GRID, values))
                    t = run(launch)
                    if t is not None:
                        results.append((t, launch))
                        by_rows.setdefault(b, {}).setdefault(values, []).append(t)
                t, launch = min(results, key=lambda r: r[0])
                best_out.append([prompt, b, bounded, t, nbytes / t / 1e3, str(launch)])
                current_of_rows.setdefault(b, []).append(bounded)
            del q, k, v
    print(f"device: {device_name()}; current settings {DECODE_LAUNCHES}")
    print(table(["prompt", "rows", "µs (reads capacity)", "µs (kv_len)", "GB/s (kv_len)"],
                rows_out))
    if best_out:
        print(table(["prompt", "rows", "µs current", "µs best", "GB/s best", "best settings"],
                    best_out))
        overall = []
        for b, timed in by_rows.items():
            full = {v: ts for v, ts in timed.items() if len(ts) == len(args.prompt)}
            values, ts = min(full.items(), key=lambda kv: sum(kv[1]))
            overall.append([b, [round(t, 1) for t in current_of_rows[b]],
                            [round(t, 1) for t in ts], str(dict(zip(GRID, values)))])
        print(table(["rows", "µs current per prompt", "µs best per prompt",
                     "best settings over all prompts"], overall))


if __name__ == "__main__":
    main()
