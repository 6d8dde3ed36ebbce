"""Triton one-shot all-reduce over symmetric buffers, with ONE barrier per call.

torch's ``one_shot_all_reduce`` opens and closes with a cross-GPU barrier (two NVLink round
trips, ~2 µs each on H200). The closing barrier only protects the buffer from being overwritten
while a peer still reads it; :class:`~megatron_ext.communication.symm_mem.SymmMemAllReduce` alternates
two slots instead, so the next write to a slot always comes after the *next* call's opening
barrier — which no peer passes before it has finished reading. Kernels here therefore open with
a per-program barrier and end without one.

Per-program barrier: program ``p`` raises flag ``(p, rank)`` in every peer's signal pad (CAS
0→1, release, system scope), then waits for flag ``(p, peer)`` in its own pad and lowers it (CAS
1→0, acquire). CAS loops wait out a flag still raised by an earlier kernel instead of counting it
twice, and every flag ends at 0, so torch's own symmetric kernels can share the pads.
"""
import triton
import triton.language as tl

from megatron_ext.kernels.symm_barrier import peer_buffer, symm_barrier


@triton.jit
def one_shot_sum(peers_ptr, signals_ptr, out_ptr, numel, nprog,
                 RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    symm_barrier(signals_ptr, pid, RANK, WORLD)  # opening barrier, per program
    out_ty = out_ptr.dtype.element_ty
    for start in range(0, numel, nprog * BLOCK):
        offs = start + pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(WORLD):  # group-rank order: identical bits everywhere
            src = peer_buffer(peers_ptr, r, out_ty)
            acc += tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, acc.to(out_ty), mask=mask)
