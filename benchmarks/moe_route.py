"""MoE routing bookkeeping of one decode layer (issue 16): the router's softmax + top-k and the
local dispatch's sort by expert, torch ops vs the Triton kernels (:mod:`megatron_ext.kernels.
moe_route`), Qwen3-30B-A3B routing (128 experts, top-8, norm_topk_prob), bf16 logits, one GPU:

    python benchmarks/moe_route.py [--tokens 16 64 256 1024]

µs per layer, each timed as a CUDA graph of 20 calls (no launch gaps; median of 5 replays):

* ``top-k``     — softmax + top-k (+ renormalisation) from the router logits;
* ``dispatch``  — ``local_dispatch`` of a rank holding every expert;
* ``ep2 share`` — ``local_dispatch`` of a rank holding 64 of the 128 experts during a capture
  (``fixed_size``: other ranks' assignments sorted last);
* ``route``     — top-k + dispatch (every expert): what one layer spends besides the GEMMs.

Before timing, every kernel result is checked against the torch path (dispatch fields bit-equal,
top-k experts of equal probability, weights within one bf16 ulp).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (device_name, require_cuda, table, time_graph,  # noqa: E402
                                write_results)
from megatron_ext.layers.moe.dispatch import LocalAssignments, local_dispatch  # noqa: E402
from megatron_ext.layers.moe.fused_routing import fused_top_k_softmax  # noqa: E402
from megatron_ext.layers.moe.router import top_k_softmax  # noqa: E402

EXPERTS, TOP_K, HIDDEN = 128, 8, 2048


def variants(logits: torch.Tensor, experts: torch.Tensor, kernel: bool) -> dict:
    """The timed calls of one path (``kernel``: the Triton kernels, else torch ops)."""
    def top_k():
        if kernel:
            return fused_top_k_softmax(logits, TOP_K, True)
        return top_k_softmax(logits, TOP_K, True)[1:]

    def dispatch(ids=experts):
        return local_dispatch(ids, 0, EXPERTS, EXPERTS, use_kernel=kernel)

    def share():
        return local_dispatch(experts, 0, EXPERTS // 2, EXPERTS, fixed_size=True,
                              use_kernel=kernel)

    return {"top-k": top_k, "dispatch": dispatch, "ep2 share": share,
            "route": lambda: dispatch(top_k()[1])}


def check(logits: torch.Tensor, experts: torch.Tensor) -> list[str]:
    """Kernel results against the torch path; a list of what differs."""
    bad = []
    probs, want_w, want_e = top_k_softmax(logits, TOP_K, True)
    got_w, got_e = fused_top_k_softmax(logits, TOP_K, True)
    if not torch.equal(probs.gather(1, got_e), probs.gather(1, want_e)):
        bad.append("top-k experts")
    if (got_w.view(torch.int16).int() - want_w.view(torch.int16).int()).abs().max() > 1:
        bad.append("top-k weights")
    for name, (first, num_local, fixed) in (("dispatch", (0, EXPERTS, False)),
                                            ("ep2 share", (0, EXPERTS // 2, True))):
        got, want = (local_dispatch(experts, first, num_local, EXPERTS, fixed_size=fixed,
                                    use_kernel=k) for k in (True, False))
        if not all(torch.equal(getattr(got, f.name), getattr(want, f.name))
                   for f in fields(LocalAssignments) if getattr(want, f.name) is not None):
            bad.append(name)
    return bad


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="*", default=[16, 64, 256, 1024])
    args = parser.parse_args()
    require_cuda(__file__)
    torch.manual_seed(0)
    device = torch.device("cuda")
    gate = torch.randn(EXPERTS, HIDDEN, device=device, dtype=torch.bfloat16) * 0.02
    print(f"device: {device_name()}; {EXPERTS} experts, top-{TOP_K}, bf16 logits", flush=True)
    rows, results = [], {}
    with torch.no_grad():
        for tokens in args.tokens:
            x = torch.randn(tokens, HIDDEN, device=device, dtype=torch.bfloat16)
            logits = torch.nn.functional.linear(x, gate)
            experts = top_k_softmax(logits, TOP_K, True)[2]
            bad = check(logits, experts)
            if bad:
                print(f"T={tokens}: kernel results differ from torch: {bad}", flush=True)
            timed = {path: {name: time_graph(fn) for name, fn in
                            variants(logits, experts, path == "kernel").items()}
                     for path in ("torch", "kernel")}
            results[tokens] = {"timings_us": timed, "mismatches": bad}
            row = [tokens]
            for name in ("top-k", "dispatch", "ep2 share", "route"):
                t, k = timed["torch"][name], timed["kernel"][name]
                row += [t, k, None if not (t and k) else f"{t / k:.1f}x"]
            rows.append(row)
    headers = ["T"] + [f"{n} {c}" for n in ("top-k", "dispatch", "ep2 share", "route")
                       for c in ("torch", "kernel", "gain")]
    print(table(headers, rows), flush=True)
    write_results("moe_route", {"device": device_name(), "experts": EXPERTS, "top_k": TOP_K,
                                "results": results})


if __name__ == "__main__":
    main()
