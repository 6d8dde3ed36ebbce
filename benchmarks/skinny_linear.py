"""A decode step's projections of a few rows: cuBLAS (``F.linear``) vs the one-launch Triton
kernel (:mod:`megatron_ext.layers.skinny_linear`), each timed from a CUDA graph, one GPU:

    python benchmarks/skinny_linear.py [--rows 16 32 64 128 256] [--sweep]

Shapes of Qwen3-30B-A3B on one rank of attn_cp 2: the router ``[128, 2048]``, the fused q/k/v
``[5120, 2048]``, the output projection ``[2048, 4096]``. Results are first checked within one
bf16 ulp of cuBLAS (plus float32 summation-order differences). ``--sweep`` times a grid of launches per shape and prints, per shape, the
best launch and whether it beats cuBLAS at every row count — the ``SKINNY_LAUNCH`` lines to
table (a shape where cuBLAS wins somewhere stays off the table).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import device_name, require_cuda, table, time_graph  # noqa: E402
from megatron_ext.layers.skinny_linear import (SKINNY_LAUNCH, SkinnyLaunch,  # noqa: E402
                                               skinny_linear)

SHAPES = {"router": (128, 2048), "qkv": (5120, 2048), "o_proj": (2048, 4096)}
GRID = [SkinnyLaunch(*c) for c in itertools.product((16, 32), (16, 32, 64), (128, 256), (4,),
                                                    (3, 4))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="*", default=[16, 32, 64, 128, 256])
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    require_cuda(__file__)
    torch.manual_seed(0)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    print(f"device: {device_name()}", flush=True)
    out_rows, lines = [], []
    with torch.no_grad():
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k, device=dev, dtype=dtype) * 0.02
            per_launch: dict = {}
            for rows in args.rows:
                x = torch.randn(rows, k, device=dev, dtype=dtype)
                want = torch.nn.functional.linear(x, w).float()
                cublas = time_graph(lambda: torch.nn.functional.linear(x, w))
                grid = GRID if args.sweep else [SKINNY_LAUNCH.get((n, k), GRID[0])]
                best = None
                for c in grid:
                    got = skinny_linear(x, w, None, c).float()
                    terms = x.float().abs() @ w.float().abs().T   # float32 order differences
                    if not bool(((got - want).abs() <= 2 ** -7 * want.abs()
                                 + k * 2 ** -23 * terms).all()):
                        print(f"{name} rows={rows} {c}: differs from cuBLAS beyond rounding",
                              flush=True)
                        continue
                    t = time_graph(lambda c=c: skinny_linear(x, w, None, c))
                    if t is None:
                        continue
                    per_launch.setdefault(c, []).append(t / cublas)
                    if best is None or t < best[0]:
                        best = (t, c)
                if best is None:
                    print(f"{name} rows={rows}: no launch ran", flush=True)
                    continue
                gb_per_s = n * k * 2 / best[0] / 1e3   # weight bytes / µs → GB/s
                out_rows.append([name, rows, cublas, best[0], f"{cublas / best[0]:.2f}x",
                                 f"{gb_per_s:.0f}", str(best[1])])
            full = {c: r for c, r in per_launch.items() if len(r) == len(args.rows)}
            if not full:
                continue
            c, ratios = min(full.items(), key=lambda kv: max(kv[1]))
            verdict = "table it" if max(ratios) < 1.0 else "keep cuBLAS"
            lines.append(f"    ({n}, {k}): {c!r},  # {name}: worst {max(ratios):.2f}x of cuBLAS "
                         f"time over rows {args.rows} — {verdict}")
    print(table(["shape", "rows", "cuBLAS µs", "kernel µs", "speed-up", "GB/s", "launch"],
                out_rows))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
