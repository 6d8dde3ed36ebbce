"""Symmetric-memory all-reduce for attention-TP sums (design §1, origin 3).

Why: on one NVLink host an attention-TP all-reduce of a few hundred KB is latency-bound, and
NCCL's launch + protocol cost dominates it. With the partial sums in torch symmetric memory
(``torch.distributed._symmetric_memory``) every rank can read its peers' buffers directly, so a
one-shot kernel (each rank reads all peers and sums) or a two-shot kernel (reduce-scatter then
all-gather through peer loads) finishes the sum in one launch.

Rule (design §1, origin 3): symmetric kernels need every rank of the group to reduce the *same* number of
elements — otherwise they read past a peer's data or wait forever. That holds for attention TP
(all ranks of the group hold the same ``TP_ATTN_FULL`` tokens); it does not hold across attention
DP with uneven batches. So :class:`SymmMemAllReduce` is enabled by default only for the
``attn_tp`` axis; any other axis must say ``uniform_tokens=True`` explicitly.

It switches itself off — and every call goes to ``torch.distributed.all_reduce`` (NCCL, or gloo on
CPU) — on CPU, without CUDA, with a one-rank group, for a non-NCCL group, when the symmetric
memory module or its kernels are unavailable, or with ``MEGATRON_EXT_SYMM_MEM=0``. ``reason``
says why. The decision is taken jointly by every rank of the group, so no rank waits in a
rendezvous the others skipped.

The buffer holds two slots used in turn (:meth:`SymmMemAllReduce.partial_buffer`): a row-parallel
layer writes its partial output straight into a slot (:func:`row_parallel_linear_into`), the
reduction reads it there. Two slots let a kernel that ends without a trailing barrier (the fused
reduce + RMSNorm kernel) be safe: a rank writes a slot again only after the next reduction's
opening barrier, which every peer reaches only after it finished reading that slot.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_ext.parallel.axes import Axis
from megatron_ext.parallel.comm_counter import record
from megatron_ext.parallel.groups import AxisGroup
from megatron_ext.kernels.launch import sm_count
from megatron_ext.kernels.triton_loader import kernel_module
from megatron_ext.communication.raw import all_reduce_


def _one_shot_sum():
    """The Triton one-shot sum (:mod:`megatron_ext.kernels.symm_all_reduce`), or ``None``."""
    k = kernel_module("symm_all_reduce")
    return None if k is None else k.one_shot_sum


ONE_SHOT = "one_shot"
TWO_SHOT = "two_shot"
NCCL = "nccl"        # torch.distributed.all_reduce on the group (NCCL on GPU, gloo on CPU)
LOCAL = "local"      # one-rank group: nothing to reduce

# dtypes torch's one-/two-shot kernels dispatch on (AT_DISPATCH_FLOAT_AND_BFLOAT16)
SYMM_DTYPES = (torch.float32, torch.bfloat16)
_SLOT_ALIGN = 256  # bytes; the kernels want 16-byte alignment, keep whole cache lines
ENV_SWITCH = "MEGATRON_EXT_SYMM_MEM"


@dataclass(frozen=True)
class SymmMemConfig:
    """Which kernel reduces a message of a given size (bytes of one rank's tensor).

    ``<= one_shot_max_bytes`` → one-shot, ``<= two_shot_max_bytes`` → two-shot, larger → NCCL
    (also anything larger than one slot). ``one_shot_max_bytes=None``: the whole slot for two
    ranks, 1 MB for more. From ``benchmarks/reduction_latency.py`` on 2×H200 (BENCHMARKS.md):
    with two ranks the one-barrier Triton one-shot kernel is fastest at every size up to the
    32 MB slot (108 µs vs 130 two-shot, 140 NCCL at 32 MB); with more ranks one-shot reads
    ``(world-1)×`` the message over NVLink, two-shot ``2(world-1)/world×``, so two-shot takes
    over for large messages.

    ``one_shot_kernel`` for a partial already in a slot: ``"triton"`` (one barrier per call:
    lowest GPU time), ``"torch"`` (torch's op, two barriers, lowest CPU launch cost), ``"auto"``:
    Triton while a CUDA graph is being captured (launch cost paid once) or from
    ``triton_eager_min_bytes`` up (GPU time dominates: eager at 4 MB 19.7 µs vs torch's 32.4;
    at 1 MB both 15 µs, at 256 KB Triton's ~15 µs Python launch loses to torch's 10.5),
    torch's op otherwise.
    """

    slot_bytes: int = 32 * 2**20
    one_shot_max_bytes: Optional[int] = None
    two_shot_max_bytes: int = 32 * 2**20
    one_shot_kernel: str = "auto"
    triton_eager_min_bytes: int = 2 * 2**20

    def __post_init__(self) -> None:
        if self.one_shot_kernel not in ("auto", "triton", "torch"):
            raise ValueError(f"SymmMemConfig.one_shot_kernel={self.one_shot_kernel!r} must be "
                             f"'auto', 'triton' or 'torch'")
        for name in ("slot_bytes", "one_shot_max_bytes", "two_shot_max_bytes",
                     "triton_eager_min_bytes"):
            value = getattr(self, name)
            if name == "one_shot_max_bytes" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"SymmMemConfig.{name}={value!r} must be an integer >= 0")
        if self.slot_bytes == 0 or self.slot_bytes % _SLOT_ALIGN:
            raise ValueError(f"SymmMemConfig.slot_bytes={self.slot_bytes} must be a positive "
                             f"multiple of {_SLOT_ALIGN}")
        if self.one_shot_max_bytes is not None and \
                self.one_shot_max_bytes > self.two_shot_max_bytes:
            raise ValueError(f"SymmMemConfig.one_shot_max_bytes={self.one_shot_max_bytes} must "
                             f"be <= two_shot_max_bytes={self.two_shot_max_bytes}")
        if self.two_shot_max_bytes > self.slot_bytes:
            raise ValueError(f"SymmMemConfig.two_shot_max_bytes={self.two_shot_max_bytes} must "
                             f"be <= slot_bytes={self.slot_bytes} (a message must fit one slot)")

    def one_shot_limit(self, world: int) -> int:
        """``one_shot_max_bytes`` resolved for a group of ``world`` ranks."""
        if self.one_shot_max_bytes is not None:
            return self.one_shot_max_bytes
        return self.two_shot_max_bytes if world == 2 else min(2**20, self.two_shot_max_bytes)


def group_unavailable_reason(axis: AxisGroup, device: torch.device,
                             uniform_tokens: Optional[bool] = None) -> Optional[str]:
    """Why symmetric memory cannot serve ``axis``, from facts every rank of the group shares
    (no collective), or ``None``."""
    device = torch.device(device)
    if axis.is_trivial:
        return "one-rank group: nothing to reduce"
    if axis.group is None:
        return f"axis {axis.name} has no process group"
    uniform = (axis.name == Axis.ATTN_TP) if uniform_tokens is None else uniform_tokens
    if not uniform:
        return (f"axis {axis.name}: ranks may hold different token counts (symmetric memory "
                f"only where every rank reduces the same size, e.g. attention TP)")
    if device.type != "cuda":
        return f"device {device} is not CUDA"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    backend = str(dist.get_backend(axis.group)).lower()
    if "nccl" not in backend:
        return f"group backend is {backend}, not NCCL"
    return None


def rank_unavailable_reason() -> Optional[str]:
    """Why this rank cannot use symmetric memory (environment switch, import), or ``None``.
    These may differ between ranks, so :class:`SymmMemAllReduce` puts them to a vote."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return f"disabled by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: not available
        return f"torch symmetric memory unavailable: {exc}"
    return None


def _agree(axis: AxisGroup, device: torch.device, ok: bool) -> bool:
    """True only if every rank of the group says ok (one small all-reduce, at construction)."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    all_reduce_(flag, axis, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class SymmMemAllReduce:
    """All-reduce (sum) over one group through symmetric memory, NCCL where that can't serve.

    Construction is collective over ``axis`` when symmetric memory is possible (agreement +
    rendezvous); otherwise it is free and every call goes to ``torch.distributed``.
    """

    def __init__(self, axis: AxisGroup, device: torch.device | str | None = None,
                 config: SymmMemConfig = SymmMemConfig(),
                 uniform_tokens: Optional[bool] = None) -> None:
        if not isinstance(config, SymmMemConfig):
            raise ValueError(f"config must be a SymmMemConfig, got {type(config).__name__}")
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) \
                if torch.cuda.is_available() else torch.device("cpu")
        self.axis = axis
        self.device = torch.device(device)
        self.config = config
        self.reason: Optional[str] = group_unavailable_reason(axis, self.device, uniform_tokens)
        self._buffer: Optional[torch.Tensor] = None
        self._handle = None
        self._next_slot = 0
        self._barrier_ready = False
        self._peer_ptr_cache: dict[int, torch.Tensor] = {}
        self._signal_ptrs: Optional[torch.Tensor] = None
        self._keep_alive: list[torch.Tensor] = []
        if self.reason is None:  # every rank of the group gets here: safe to vote
            self._try_enable(rank_unavailable_reason())

    # ------------------------------------------------------------------ construction
    def _try_enable(self, own_reason: Optional[str]) -> None:
        if not _agree(self.axis, self.device, own_reason is None):
            self.reason = own_reason or "another rank of the group cannot use symmetric memory"
            return
        try:
            import torch.distributed._symmetric_memory as symm_mem

            group_name = self.axis.group.group_name
            if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed before torch 2.9
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    symm_mem.enable_symm_mem_for_group(group_name)
            buf = symm_mem.empty(2 * self.config.slot_bytes, dtype=torch.uint8, device=self.device)
            handle = symm_mem.rendezvous(buf, group_name)
        except Exception as exc:  # noqa: BLE001 - fall back to NCCL, say why
            self.reason = f"symmetric memory allocation/rendezvous failed: {exc}"
            return
        self._buffer, self._handle, self._group_name = buf, handle, group_name
        self.signal_pointers()  # the slot starts' pointers too: ready before any graph capture
        for slot in (0, 1):
            self.peer_pointers(self._slot(slot, _SLOT_ALIGN))

    # ------------------------------------------------------------------ queries
    @property
    def enabled(self) -> bool:
        return self._handle is not None

    @property
    def world_size(self) -> int:
        return self.axis.size

    @property
    def rank(self) -> int:
        return self.axis.rank

    def fits_slot(self, nbytes: int, dtype: torch.dtype) -> bool:
        """Whether a tensor of ``nbytes`` bytes of ``dtype`` can live in one symmetric slot."""
        return self.enabled and dtype in SYMM_DTYPES and nbytes <= self.config.slot_bytes

    def method_for(self, nbytes: int, dtype: torch.dtype = torch.bfloat16) -> str:
        """Which path reduces a tensor of ``nbytes`` bytes (per rank) of ``dtype``."""
        if self.axis.is_trivial:
            return LOCAL
        # torch's kernels need whole 4-byte words (an odd count of bf16 elements goes to NCCL)
        if not self.fits_slot(nbytes, dtype) or nbytes % 4:
            return NCCL
        if nbytes <= self.config.one_shot_limit(self.world_size):
            return ONE_SHOT
        if nbytes <= self.config.two_shot_max_bytes:
            return TWO_SHOT
        return NCCL

    def in_buffer(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is a contiguous view inside this reducer's symmetric buffer."""
        if self._buffer is None or not tensor.is_cuda or not tensor.is_contiguous():
            return False
        base = self._buffer.data_ptr()
        start = tensor.data_ptr()
        return base <= start and start + tensor.numel() * tensor.element_size() <= \
            base + self._buffer.numel()

    # ------------------------------------------------------------------ buffers
    def partial_buffer(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A tensor to write a partial sum into: the next symmetric slot when it fits, else a
        plain ``torch.empty``. Every rank must ask for the same shape (attention TP: it does).
        It serves ONE reduction: write it, reduce it, then ask again (slots alternate, which is
        what lets the one-barrier kernels skip their closing barrier)."""
        shape = tuple(int(s) for s in shape)
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if not self.fits_slot(nbytes, dtype):
            return torch.empty(shape, dtype=dtype, device=self.device)
        return self._slot(self._take_slot(), nbytes).view(dtype).view(shape)

    def next_slot(self, nbytes: int) -> torch.Tensor:
        """The next of the two slots (alternating), as ``nbytes`` raw bytes: for kernels that
        copy their input in themselves (:mod:`~megatron_ext.communication.symm_collectives`)."""
        if not self.enabled or nbytes > self.config.slot_bytes:
            raise ValueError(f"next_slot: {nbytes} bytes need an enabled buffer with slots of at "
                             f"least that ({self.describe()})")
        return self._slot(self._take_slot(), nbytes)

    def _take_slot(self) -> int:
        slot = self._next_slot
        self._next_slot ^= 1
        return slot

    def align_slot(self, slot: int = 0) -> None:
        """Make ``slot`` the next slot, taking the other one's turn with a barrier-only kernel if
        needed. Slots are safe to rewrite because they alternate (a rank writes a slot again only
        after the next call's opening barrier); a replayed CUDA graph breaks the alternation when
        it takes an odd number of slots, or when eager calls between replays leave the turn
        elsewhere — the same slot twice in a row, a peer possibly still reading it. Aligning to
        slot 0 before a capture, at its end (inside it) and before every replay keeps every graph
        boundary alternating. Collective over the group: every rank's turn is the same."""
        if not self.enabled:
            return
        if not self._barrier_ready and not torch.cuda.is_current_stream_capturing():
            self._turn_without_data()   # compiled outside any capture; two turns: same slot next
            self._turn_without_data()
            self._barrier_ready = True
        if self._next_slot != slot:
            self._turn_without_data()

    def _turn_without_data(self) -> None:
        self._take_slot()
        kernel_module("symm_barrier").barrier_only[(1,)](
            self.signal_pointers(), RANK=self.rank, WORLD=self.world_size)

    def _slot(self, slot: int, nbytes: int) -> torch.Tensor:
        start = slot * self.config.slot_bytes
        return self._buffer[start:start + nbytes]

    def _device_int64(self, values: list[int]) -> torch.Tensor:
        """A small int64 device tensor; copied from pinned memory, so it may be made while a
        CUDA graph is captured (the host copy is kept alive beside it)."""
        host = torch.tensor(values, dtype=torch.int64)
        if torch.cuda.is_current_stream_capturing():
            host = host.pin_memory()
            dev = host.to(self.device, non_blocking=True)
            self._keep_alive.append(host)
            return dev
        return host.to(self.device)

    def peer_pointers(self, tensor: torch.Tensor) -> torch.Tensor:
        """int64 tensor (on device) with the address of ``tensor``'s bytes in every rank's
        buffer, in group-rank order (for kernels that read peers directly)."""
        if not self.in_buffer(tensor):
            raise ValueError("peer_pointers: tensor is not inside the symmetric buffer")
        offset = tensor.data_ptr() - self._handle.buffer_ptrs[self._handle.rank]
        cached = self._peer_ptr_cache.get(offset)
        if cached is None:
            cached = self._device_int64([int(p) + offset for p in self._handle.buffer_ptrs])
            self._peer_ptr_cache[offset] = cached
        return cached

    def signal_pointers(self) -> torch.Tensor:
        """int64 tensor (on device) with every rank's signal-pad address (uint32 flags)."""
        if self._signal_ptrs is None:
            self._signal_ptrs = self._device_int64([int(p) for p in
                                                    self._handle.signal_pad_ptrs])
        return self._signal_ptrs

    @property
    def signal_slots(self) -> int:
        """Number of uint32 flags in one rank's signal pad."""
        return int(self._handle.signal_pad_size) // 4

    def stage_in_buffer(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` itself if it already lives in a slot, else a copy in the next slot."""
        if self.in_buffer(tensor):
            return tensor
        staged = self.partial_buffer(tensor.shape, tensor.dtype)
        staged.copy_(tensor)
        return staged

    # ------------------------------------------------------------------ reduction
    def all_reduce(self, tensor: torch.Tensor, method: Optional[str] = None) -> torch.Tensor:
        """Sum of ``tensor`` over the group, as a new tensor (``tensor`` itself for one rank).

        Forward-only (no autograd); :func:`all_reduce_sum` is the differentiable form. The
        result is summed in group-rank order on every rank, so all ranks hold identical bits.
        """
        nbytes = tensor.numel() * tensor.element_size()
        method = method or self.method_for(nbytes, tensor.dtype)
        if method == LOCAL:
            return tensor
        record("all_reduce", self.axis.name, nbytes)
        if tensor.numel() == 0:
            return tensor.clone()
        if method == NCCL:
            out = tensor.contiguous().clone()
            dist.all_reduce(out, group=self.axis.group)
            return out
        if not self.enabled:
            raise ValueError(f"method {method!r} needs symmetric memory, which is off: "
                             f"{self.reason}")
        if not self.fits_slot(nbytes, tensor.dtype) or nbytes % 4:
            raise ValueError(f"method {method!r} needs a {'/'.join(map(str, SYMM_DTYPES))} "
                             f"tensor of whole 4-byte words within one slot "
                             f"({self.config.slot_bytes} bytes); got {nbytes} bytes of "
                             f"{tensor.dtype}")
        src = tensor.contiguous()
        out = torch.empty_like(src)
        if method == ONE_SHOT:
            triton = self._use_triton_one_shot(nbytes)
            if triton:
                self._one_shot_triton(self.stage_in_buffer(src), out)
            elif self.in_buffer(src):
                torch.ops.symm_mem.one_shot_all_reduce_out(src, "sum", self._group_name, out)
            else:  # the kernel copies our input into the slot itself: no extra launch
                slot = self._slot(self._take_slot(), nbytes).view(src.dtype).view(src.shape)
                torch.ops.symm_mem.one_shot_all_reduce_copy_out(slot, src, "sum",
                                                               self._group_name, out)
            return out
        if method == TWO_SHOT:
            staged = self.stage_in_buffer(src)
            if hasattr(torch.ops.symm_mem, "two_shot_all_reduce_out"):
                torch.ops.symm_mem.two_shot_all_reduce_out(staged, "sum", self._group_name, out)
            else:  # older torch: in place in the slot, then out of it
                torch.ops.symm_mem.two_shot_all_reduce_(staged, "sum", self._group_name)
                out.copy_(staged)
            return out
        raise ValueError(f"unknown all-reduce method {method!r}; use one of "
                         f"{ONE_SHOT}, {TWO_SHOT}, {NCCL}, {LOCAL}")

    def _use_triton_one_shot(self, nbytes: int) -> bool:
        choice = self.config.one_shot_kernel
        if choice == "torch" or _one_shot_sum() is None:
            return False
        return (choice == "triton" or nbytes >= self.config.triton_eager_min_bytes
                or torch.cuda.is_current_stream_capturing())

    def _one_shot_triton(self, src: torch.Tensor, out: torch.Tensor) -> None:
        """Sum of the slot view ``src`` over the group into ``out`` (one kernel, one barrier)."""
        numel, block = src.numel(), 4096
        grid = max(1, min(-(-numel // block), 2 * sm_count(self.device),
                          self.signal_slots // self.world_size))
        _one_shot_sum()[(grid,)](self.peer_pointers(src), self.signal_pointers(), out, numel,
                                   grid, RANK=self.rank, WORLD=self.world_size, BLOCK=block,
                                   num_warps=8)

    def describe(self) -> str:
        state = "symmetric memory" if self.enabled else f"NCCL/gloo fallback ({self.reason})"
        return f"SymmMemAllReduce(axis={self.axis.name}, size={self.axis.size}, {state})"

    __repr__ = describe


class _AllReduceSum(torch.autograd.Function):
    """Sum of partials → replicated value; adjoint: identity (every rank's gradient is whole)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, reducer: SymmMemAllReduce) -> torch.Tensor:
        return reducer.all_reduce(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def all_reduce_sum(tensor: torch.Tensor, reducer: SymmMemAllReduce) -> torch.Tensor:
    """Differentiable sum of partial tensors over ``reducer``'s group."""
    if reducer.axis.is_trivial:
        return tensor
    return _AllReduceSum.apply(tensor, reducer)


class _RowParallelLinearInto(torch.autograd.Function):
    """``x @ weight.T`` written straight into a symmetric slot (no copy before the reduction)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, reducer: SymmMemAllReduce):
        ctx.save_for_backward(x, weight)
        x2 = x.reshape(-1, x.shape[-1])
        out = reducer.partial_buffer((x2.shape[0], weight.shape[0]), x.dtype)
        torch.mm(x2, weight.t(), out=out)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ weight).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = g2.t() @ x.reshape(-1, x.shape[-1])
        return grad_x, grad_w, None


def row_parallel_linear_into(x: torch.Tensor, weight: torch.Tensor,
                             reducer: Optional[SymmMemAllReduce]) -> torch.Tensor:
    """The partial output of a row-parallel linear (no bias: add it after the sum), allocated in
    ``reducer``'s symmetric buffer when it is enabled and the output fits a slot; a plain
    ``F.linear`` otherwise. The result must be reduced before the slot after next is taken."""
    if reducer is None or not reducer.enabled or x.dtype != weight.dtype:
        return torch.nn.functional.linear(x, weight)
    nbytes = x.numel() // x.shape[-1] * weight.shape[0] * x.element_size()
    if x.dtype not in SYMM_DTYPES or nbytes > reducer.config.slot_bytes:
        return torch.nn.functional.linear(x, weight)
    return _RowParallelLinearInto.apply(x, weight, reducer)
