"""The per-program cross-GPU barrier over symmetric-memory signal pads (a Triton device function).

Program ``pid`` raises flag ``(pid, RANK)`` in every peer's signal pad (CAS 0→1, release, system
scope), then waits for flag ``(pid, peer)`` in its own pad and lowers it (CAS 1→0, acquire). CAS
loops wait out a flag still raised by an earlier kernel instead of counting it twice, and every
flag ends at 0, so torch's own symmetric kernels can share the pads. Kernels open with it and need
no closing barrier: :class:`~megatron_ext.communication.symm_mem.SymmMemAllReduce` alternates two
buffer slots, so a slot is rewritten only after the *next* call's opening barrier.

Imported only through :func:`megatron_ext.kernels.triton_loader.kernel_module` (needs Triton)."""
import triton
import triton.language as tl


@triton.jit
def symm_barrier(signals_ptr, pid, RANK: tl.constexpr, WORLD: tl.constexpr):
    own_pad = tl.load(signals_ptr + RANK).to(tl.pointer_type(tl.uint32))
    for r in tl.static_range(WORLD):
        if r != RANK:
            peer_pad = tl.load(signals_ptr + r).to(tl.pointer_type(tl.uint32))
            flag = peer_pad + pid * WORLD + RANK
            old = tl.atomic_cas(flag, 0, 1, sem="release", scope="sys")
            while old != 0:
                old = tl.atomic_cas(flag, 0, 1, sem="release", scope="sys")
    for r in tl.static_range(WORLD):
        if r != RANK:
            flag = own_pad + pid * WORLD + r
            old = tl.atomic_cas(flag, 1, 0, sem="acquire", scope="sys")
            while old != 1:
                old = tl.atomic_cas(flag, 1, 0, sem="acquire", scope="sys")


@triton.jit
def barrier_only(signals_ptr, RANK: tl.constexpr, WORLD: tl.constexpr):
    """One program's barrier and nothing else: takes a buffer slot's turn without data (see
    :meth:`~megatron_ext.communication.symm_mem.SymmMemAllReduce.align_slot`)."""
    symm_barrier(signals_ptr, tl.program_id(0), RANK, WORLD)


@triton.jit
def peer_buffer(peers_ptr, rank, ty: tl.constexpr):
    """Rank ``rank``'s buffer from the table of peer addresses, as a ``ty`` pointer marked 16-byte
    aligned (symmetric buffers and their slots are). Triton cannot see the alignment of a pointer
    loaded from memory, and without the mark it moved peer data 2-4 bytes per instruction: a 4 MB
    all-gather ran at 72 GB/s over NVLink (BENCHMARKS.md §11e)."""
    return tl.multiple_of(tl.load(peers_ptr + rank).to(tl.pointer_type(ty)), 16)
