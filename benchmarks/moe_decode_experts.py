"""Routed experts of one decode step on one GPU: the gather + three grouped GEMMs + weighted
SwiGLU path against the two fused decode kernels (:mod:`megatron_ext.layers.moe.decode_experts`).

    python benchmarks/moe_decode_experts.py [--tokens 16 32 64 128 256] [--sweep]

Shapes (local experts × expert width, hidden 2048, Qwen3-30B-A3B): ``128x384`` (moe_tp 2),
``64x768`` (moe_ep 2: this rank holds experts 0..63 of 128 and uses the fixed-size dispatch of a
captured step, so half the rows are other ranks'), ``128x768`` (experts replicated). Routing:
random top-8 of 128 experts per token, bf16. Both paths start from the dispatched assignments
(the routing-weight gather included) and are timed as CUDA graphs of 20 calls (µs per call,
median of 5 replays). "weights" are the bytes of the experts that got a row (what a step must
read); GB/s and % are those bytes over the time, against a 4 GiB device copy of the same run.

``--sweep`` times each kernel alone over a grid of (BLOCK_N, BLOCK_K, num_warps, num_stages) at
``--sweep-tokens`` and prints per shape and rows-per-chunk (16 or 32, by the tokens' rows per
expert) the config with the least total time, as the lines of
``GATE_UP_CONFIGS`` / ``DOWN_CONFIGS`` to paste (a few minutes: one compile per config).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (device_name, hbm_bandwidth, require_cuda, table,  # noqa: E402
                                time_graph, write_results)
from megatron_ext.layers.moe import decode_experts as de  # noqa: E402
from megatron_ext.layers.moe.dispatch import gather_rows, local_dispatch, row_weights  # noqa: E402
from megatron_ext.layers.moe.experts import RoutedExperts  # noqa: E402
from megatron_ext.parallel.groups import ParallelGroups  # noqa: E402

SHAPES = {"128x384": (128, 384), "64x768": (64, 768), "128x768": (128, 768)}
BF16 = torch.bfloat16
GRID = dict(block_n=(32, 64, 128, 256), block_k=(64, 128, 256), num_warps=(4, 8),
            num_stages=(2, 3, 4))
# the sweep's config for each block_m is chosen from the --sweep-tokens that take that block_m


def make_experts(num_local: int, inter: int, hidden: int, device) -> RoutedExperts:
    return RoutedExperts(num_local, hidden, inter, ParallelGroups.single_process(), dtype=BF16,
                         device=device).eval()


def make_step(num_local: int, num_experts: int, top_k: int, tokens: int, hidden: int,
              gen: torch.Generator, device):
    """Tokens ``x``, their dispatch to experts ``[0, num_local)`` (fixed-size when the rank holds
    only some: a captured step's) and routing weights."""
    scores = torch.rand(tokens, num_experts, generator=gen, device=device)
    top, experts = scores.topk(top_k, dim=-1)
    weights = (top / top.sum(-1, keepdim=True)).to(BF16)
    assign = local_dispatch(experts, 0, num_local, num_experts,
                            fixed_size=num_local < num_experts)
    x = torch.randn(tokens, hidden, generator=gen, device=device).to(BF16)
    return x, assign, weights


def current_path(experts: RoutedExperts, x, assign, weights, top_k: int) -> torch.Tensor:
    return experts(gather_rows(x, assign, top_k), assign.counts, row_weights(weights, assign))


def fused_path(experts: RoutedExperts, x, assign, weights) -> torch.Tensor:
    return experts.forward_tokens(x, assign.token_index, assign.counts,
                                  row_weights(weights, assign))


def fused_16_rows(experts: RoutedExperts, x, assign, weights) -> torch.Tensor:
    """The fused path with 16-row chunks whatever the rows per expert (session 4's kernels: the
    same-run baseline of the 32-row chunks)."""
    inter, hidden = experts.gate_proj.shape[1:]
    gate_up = de.GATE_UP_CONFIGS.get((inter, hidden, 16), de.default_config(16))
    down = de.DOWN_CONFIGS.get((inter, hidden, 16), de.default_config(16))
    act = de.gate_up_act(x, assign.token_index, assign.counts, row_weights(weights, assign),
                         experts.gate_proj, experts.up_proj, gate_up)
    return de.down_proj_rows(act, assign.counts, experts.down_proj, down)


#: same-run variants of the tabled configs (``--variants``): ``down`` launched without PDL (the
#: tables start it while ``gate_up`` drains). A bulk L2 prefetch of each program's weight tile
#: was measured this way too and rejected (BENCHMARKS.md §11f)
VARIANTS = {"without pdl": (dict(pdl=False), dict(pdl=False))}


def fused_variant(experts: RoutedExperts, x, assign, weights, gate_up_change: dict,
                  down_change: dict) -> torch.Tensor:
    """The fused path with the tabled configs changed by ``gate_up_change`` / ``down_change``."""
    inter, hidden = experts.gate_proj.shape[1:]
    n = assign.token_index.numel()
    num_local = experts.gate_proj.shape[0]
    gate_up = de.launch_config(de.GATE_UP_CONFIGS, inter, hidden, n, num_local)
    down = de.launch_config(de.DOWN_CONFIGS, inter, hidden, n, num_local)
    act = de.gate_up_act(x, assign.token_index, assign.counts, row_weights(weights, assign),
                         experts.gate_proj, experts.up_proj, gate_up._replace(**gate_up_change))
    return de.down_proj_rows(act, assign.counts, experts.down_proj, down._replace(**down_change))


def decode_steps(args, device, seed: int):
    """``(shape, tokens, experts, x, assign, weights)`` for every ``--shapes`` × ``--tokens``,
    one expert set per shape (freed before the next)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for shape in args.shapes:
        num_local, inter = SHAPES[shape]
        experts = make_experts(num_local, inter, args.hidden, device)
        for tokens in args.tokens:
            yield (shape, tokens, experts) + make_step(num_local, args.experts, args.top_k,
                                                       tokens, args.hidden, gen, device)
        del experts
        torch.cuda.empty_cache()


def variants(args, device, bandwidth: float) -> list:
    """µs of each :data:`VARIANTS` entry next to the tabled configs, same run, same steps; each
    checked bit-equal to the tabled configs' output (PDL changes no arithmetic)."""
    rows, out = [], []
    for shape, tokens, experts, x, assign, weights in decode_steps(args, device, seed=2):
        valid = int(assign.counts.sum())
        nbytes = touched_bytes(experts, assign.counts)
        with torch.no_grad():
            ref = fused_path(experts, x, assign, weights)[:valid]
            base = time_graph(lambda: fused_path(experts, x, assign, weights))
            line = [shape, tokens, base, 100 * nbytes / base / 1e-6 / bandwidth]
            record = dict(shape=shape, tokens=tokens, tabled_us=base)
            for name, (gu, dn) in VARIANTS.items():
                try:
                    got = fused_variant(experts, x, assign, weights, gu, dn)[:valid]
                    same = bool(torch.equal(got, ref))
                    t = time_graph(lambda: fused_variant(experts, x, assign, weights, gu, dn))
                except Exception as exc:  # noqa: BLE001 - report, keep the others
                    print(f"{shape} {tokens} {name}: {type(exc).__name__}: {exc}"[:300])
                    same, t = False, None
                record[name] = dict(us=t, equal=same)
                line += [t, None if t is None else 100 * nbytes / t / 1e-6 / bandwidth,
                         "=" if same else "DIFF"]
        rows.append(line)
        out.append(record)
        print(record, flush=True)
    head = ["shape", "tokens", "tabled µs", "%HBM"]
    for name in VARIANTS:
        head += [f"{name} µs", "%HBM", "bits"]
    print(f"\nVariants of the fused experts, same run; {device_name()}")
    print(table(head, rows), flush=True)
    return out


def touched_bytes(experts: RoutedExperts, counts: torch.Tensor) -> int:
    """Bytes of the weights of the experts that got rows (gate, up and down)."""
    per_expert = sum(p[0].numel() * p.element_size()
                     for p in (experts.gate_proj, experts.up_proj, experts.down_proj))
    return int((counts > 0).sum()) * per_expert


def compare(args, device, bandwidth: float) -> list[dict]:
    results, rows = [], []
    for shape, tokens, experts, x, assign, weights in decode_steps(args, device, seed=0):
        num_local = experts.gate_proj.shape[0]
        valid = int(assign.counts.sum())
        n_rows = assign.token_index.numel()
        with torch.no_grad():
            old = current_path(experts, x, assign, weights, args.top_k)[:valid].float()
            new = fused_path(experts, x, assign, weights)[:valid].float()
            err = float((old - new).norm() / old.norm())
            t_old = time_graph(lambda: current_path(experts, x, assign, weights, args.top_k))
            t_new = time_graph(lambda: fused_path(experts, x, assign, weights))
            block_m = de.block_rows(n_rows, num_local)
            t_16 = t_new if block_m == 16 else time_graph(
                lambda: fused_16_rows(experts, x, assign, weights))
            taken = experts.fused_decode_applies(x, n_rows)
        nbytes = touched_bytes(experts, assign.counts)
        r = dict(shape=shape, tokens=tokens, rows=valid, weight_bytes=nbytes,
                 current_us=t_old, fused_us=t_new, fused_16_rows_us=t_16, block_m=block_m,
                 rel_diff=err,
                 fused_taken=taken)
        results.append(r)
        gbs = [None if t is None else nbytes / t / 1e3 for t in (t_old, t_new)]
        pct = [None if g is None else 100 * g * 1e9 / bandwidth for g in gbs]
        rows.append([shape, tokens, valid, f"{nbytes / 1e6:.0f}", t_old, t_16, block_m, t_new,
                     None if None in (t_old, t_new) else t_old / t_new, gbs[0], gbs[1],
                     pct[0], pct[1], f"{err:.1e}", "yes" if r["fused_taken"] else "no"])
        print(r, flush=True)
    print(f"\nRouted experts of one decode step, hidden {args.hidden}, top-{args.top_k} of "
          f"{args.experts}, bf16, CUDA graphs; {device_name()}; HBM copy "
          f"{bandwidth / 1e12:.2f} TB/s")
    print(table(["local experts x width", "tokens", "rows", "weights MB", "current µs",
                 "fused 16-row µs", "block_m", "fused µs", "speedup", "current GB/s",
                 "fused GB/s", "current %HBM",
                 "fused %HBM", "rel diff", "layer uses fused"], rows), flush=True)
    return results


def sweep(args, device) -> dict:
    """Each kernel alone over :data:`GRID` × ``--sweep-block-m``; per shape and block_m the config
    with the least total time over the ``--sweep-tokens`` whose rows per expert take that block_m
    (:func:`~megatron_ext.layers.moe.decode_experts.block_rows`)."""
    gen = torch.Generator(device=device).manual_seed(1)
    best = {}
    for shape in args.shapes:
        num_local, inter = SHAPES[shape]
        experts = make_experts(num_local, inter, args.hidden, device)
        by_block: dict[int, list] = {}
        for tokens in args.sweep_tokens:
            x, assign, weights = make_step(num_local, args.experts, args.top_k, tokens,
                                           args.hidden, gen, device)
            block_m = de.block_rows(assign.token_index.numel(), num_local)
            if block_m not in args.sweep_block_m:
                continue
            rw = row_weights(weights, assign)
            with torch.no_grad():
                act = de.gate_up_act(x, assign.token_index, assign.counts, rw,
                                     experts.gate_proj, experts.up_proj)
            by_block.setdefault(block_m, []).append((tokens, x, assign, rw, act))
        tabled = {"gate_up": de.GATE_UP_CONFIGS, "down": de.DOWN_CONFIGS}
        kernels = {
            "gate_up": lambda c, s: de.gate_up_act(s[1], s[2].token_index, s[2].counts, s[3],
                                                   experts.gate_proj, experts.up_proj, c),
            "down": lambda c, s: de.down_proj_rows(s[4], s[2].counts, experts.down_proj, c),
        }
        grid = dict(GRID, **args.grid)
        for block_m, cases in by_block.items():
            configs = [de.LaunchConfig(block_m, *c, pdl=True)
                       for c in itertools.product(*grid.values())]
            for name, kernel in kernels.items():
                if name not in args.sweep_kernels:
                    continue
                timed = []
                for c in configs:
                    try:
                        with torch.no_grad():
                            times = [time_graph(lambda: kernel(c, s), iters=10, repeats=3)
                                     for s in cases]
                    except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                        print(f"{shape} {name} {tuple(c)}: {type(exc).__name__}", flush=True)
                        continue
                    if None not in times:
                        timed.append((sum(times), times, c))
                timed.sort(key=lambda t: t[0])
                now = tabled[name].get((inter, args.hidden, block_m), de.default_config(block_m))
                current = next((t for t in timed if t[2] == now), None)
                best[(shape, name, block_m)] = timed[0]
                print(f"{shape} {name} block_m {block_m}: best {tuple(timed[0][2])} µs at tokens "
                      f"{[s[0] for s in cases]}: {[round(t, 1) for t in timed[0][1]]}; tabled "
                      f"{tuple(now)}: "
                      f"{None if current is None else [round(t, 1) for t in current[1]]}; "
                      f"runners-up {[tuple(t[2]) for t in timed[1:4]]}", flush=True)
        del experts, by_block
        torch.cuda.empty_cache()
    for name, table_name in (("gate_up", "GATE_UP_CONFIGS"), ("down", "DOWN_CONFIGS")):
        print(f"{table_name} = {{")
        for (shape, kernel, block_m), found in best.items():
            if kernel == name:
                print(f"    ({SHAPES[shape][1]}, {args.hidden}, {block_m}): "
                      f"LaunchConfig{tuple(found[2])},  # {shape}")
        print("}", flush=True)
    return {f"{s} {n} {m}": {"config": tuple(v[2]), "us": v[1]} for (s, n, m), v in best.items()}


def _grid_entry(text: str) -> tuple[str, tuple[int, ...]]:
    name, _, values = text.partition("=")
    if name not in GRID or not values:
        raise argparse.ArgumentTypeError(f"{text!r}: use NAME=V1,V2 with NAME in {list(GRID)}")
    return name, tuple(int(v) for v in values.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="*", default=[16, 32, 64, 128, 256])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=128, help="global experts")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-tokens", type=int, nargs="*", default=[32, 64, 128, 256])
    parser.add_argument("--sweep-block-m", type=int, nargs="*", default=[16, 32])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--sweep-kernels", nargs="*", default=["gate_up", "down"],
                        choices=["gate_up", "down"])
    parser.add_argument("--grid", nargs="*", default=[], type=_grid_entry,
                        help="narrow the sweep's GRID, e.g. block_n=128,256 num_stages=2,3")
    parser.add_argument("--variants", action="store_true",
                        help="only the same-run variants of the tabled configs (VARIANTS)")
    args = parser.parse_args()
    args.grid = dict(args.grid)
    require_cuda(__file__)
    device = torch.device("cuda", torch.cuda.current_device())
    bandwidth = hbm_bandwidth(device)
    if args.variants:
        write_results("moe_decode_experts_variants",
                      {"device": device_name(), "args": vars(args), "hbm_bytes_per_s": bandwidth,
                       "variants": variants(args, device, bandwidth)})
        return
    payload = {"device": device_name(), "args": vars(args), "hbm_bytes_per_s": bandwidth,
               "compare": compare(args, device, bandwidth)}
    if args.sweep:
        payload["sweep"] = sweep(args, device)
    write_results("moe_decode_experts", payload)


if __name__ == "__main__":
    main()
