"""Triton one-kernel exchanges over symmetric buffers: copy in, one barrier, pull from the peers.

Each program copies its share of this rank's input into this rank's slot, raises the
per-program barrier (:func:`~megatron_ext.kernels.symm_barrier.symm_barrier`, release/acquire at
system scope) and then reads the same share of every peer's slot. Every rank launches the same
grid over the same element ranges, so what program ``p`` reads from a peer is exactly what that
peer's program ``p`` wrote before raising its flag: no separate copy kernel, no second barrier
(the caller alternates two slots, as for the one-shot sum).

``CHUNKS`` input chunks of ``n`` elements each (1 for all-gather / all-reduce, the world size
for all-to-all / reduce-scatter); a program reads chunk ``SRC_CHUNK`` of every peer's slot and
either concatenates them in group-rank order (``SUM=False``) or sums them in float32, in
group-rank order so every rank holds identical bits (``SUM=True``). Peer loads are volatile
(no L1 line of an earlier call's data can answer them).

Imported only through :func:`megatron_ext.kernels.triton_loader.kernel_module` (needs Triton)."""
import triton
import triton.language as tl

from megatron_ext.kernels.symm_barrier import peer_buffer, symm_barrier


@triton.jit
def exchange(x_ptr, peers_ptr, signals_ptr, out_ptr, n, nprog, src_chunk,
             CHUNKS: tl.constexpr, SUM: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr,
             BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    ty = out_ptr.dtype.element_ty
    own = peer_buffer(peers_ptr, RANK, ty)
    for start in range(0, n, nprog * BLOCK):          # copy in: this program's share
        offs = start + pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        for c in tl.static_range(CHUNKS):
            tl.store(own + c * n + offs, tl.load(x_ptr + c * n + offs, mask=mask), mask=mask)
    tl.debug_barrier()   # every thread's copy-in before the flag's release (one thread raises it)
    symm_barrier(signals_ptr, pid, RANK, WORLD)
    for start in range(0, n, nprog * BLOCK):          # pull the same share from every rank
        offs = start + pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        if SUM:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for r in tl.static_range(WORLD):
                src = peer_buffer(peers_ptr, r, ty)
                acc += tl.load(src + src_chunk * n + offs, mask=mask, other=0.0,
                               volatile=True).to(tl.float32)
            tl.store(out_ptr + offs, acc.to(ty), mask=mask)
        else:
            for r in tl.static_range(WORLD):
                src = peer_buffer(peers_ptr, r, ty)
                tl.store(out_ptr + r * n + offs,
                         tl.load(src + src_chunk * n + offs, mask=mask, volatile=True), mask=mask)
