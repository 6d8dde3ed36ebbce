"""Shared bits of the GPU benchmarks: the CUDA requirement, torchrun init, device-event timing,
tables, result files."""
from __future__ import annotations

import json
import os
import statistics
import sys
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist


def require_cuda(script: str, cpu_option: str = "") -> None:
    """A GPU-only script on a machine without CUDA: one line on stderr naming ``script`` and exit
    2, before any process group exists or ``torch.cuda`` is touched (which otherwise dies deep
    inside with "torch._C has no attribute _cuda_setDevice"). ``cpu_option``: the flag that runs
    the script on the CPU instead, if it has one."""
    if torch.cuda.is_available():
        return
    hint = f" (or pass {cpu_option} to run it on the CPU)" if cpu_option else ""
    print(f"{os.path.basename(script)}: needs CUDA, and this machine has no CUDA device{hint}",
          file=sys.stderr, flush=True)
    raise SystemExit(2)


def init_nccl() -> tuple[int, int, torch.device]:
    """Initialise NCCL from torchrun's environment; returns (rank, world, device)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    return rank, world, device


def time_eager(fn: Callable[[], object], iters: int = 50, repeats: int = 5,
               warmup: int = 5, group=None) -> float:
    """Median over ``repeats`` of the mean time per call (µs) of ``iters`` back-to-back calls,
    timed with CUDA events (ranks aligned by a barrier before each repeat)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier(group=group)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000.0 / iters)
    return statistics.median(samples)


def time_graph(fn: Callable[[], object], iters: int = 20, repeats: int = 5,
               group=None) -> Optional[float]:
    """Like :func:`time_eager` but replaying a CUDA graph of ``iters`` calls (no launch gaps).
    ``None`` if capture fails."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - report, don't abort the whole benchmark
        if dist.is_initialized():
            dist.barrier(group=group)
        print(f"[graph capture failed: {type(exc).__name__}: {str(exc)[:120]}]", flush=True)
        return None
    samples = []
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier(group=group)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000.0 / iters)
    del graph
    return statistics.median(samples)


def hbm_bandwidth(device) -> float:
    """Bytes/s of a 4 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(2 ** 31, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 10
    del src, dst
    return 2 * 2 ** 32 / seconds


def fmt_bytes(n: int) -> str:
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (pasteable into BENCHMARKS.md)."""
    def cell(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict) -> None:
    """JSON under $OUT (the device tool's output folder) or ./bench_results."""
    out = os.environ.get("OUT") or "bench_results"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as fh:
        json.dump(payload, fh, indent=1, default=str)


def device_name() -> str:
    return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"


def time_forward_once(fn: Callable[[], object], tokens: int, reps: int,
                      aligned: bool = True) -> dict:
    """One long forward ``fn`` timed with CUDA events (median of ``reps`` after a warm-up; with
    ``aligned`` ranks meet at a barrier before each): seconds, tokens/s and this process's peak
    memory, or ``{"error": "OOM: ..."}`` when it does not fit."""
    try:
        torch.cuda.reset_peak_memory_stats()
        times = []
        with torch.no_grad():
            for i in range(reps + 1):
                if aligned:
                    dist.barrier()
                torch.cuda.synchronize()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                if i:
                    times.append(start.elapsed_time(end) / 1000)
        t = statistics.median(times)
        res = {"s": t, "tok_per_s": tokens / t,
               "peak_GiB": torch.cuda.max_memory_allocated() / 2**30}
    except torch.OutOfMemoryError as exc:
        res = {"error": f"OOM: {str(exc)[:80]}"}
    torch.cuda.empty_cache()
    return res


def time_long_forward(fn: Callable[[], object], tokens: int, reps: int, world: int,
                      weights_gib: float) -> dict:
    """:func:`time_forward_once` on every rank, plus the weights' memory and every rank's peak.
    Collective over the world."""
    res = time_forward_once(fn, tokens, reps)
    if "error" not in res:
        res["weights_GiB"] = weights_gib
    peaks = [None] * world
    dist.all_gather_object(peaks, res.get("peak_GiB"))
    res["peak_GiB_per_rank"] = peaks
    return res
