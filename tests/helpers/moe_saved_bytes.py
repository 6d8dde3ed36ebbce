"""What one MoE layer keeps for backward, counted with saved-tensor hooks (run in spawned ranks by
``tests/integration/test_moe_memory.py``; kept free of pytest).

The layer must keep exactly what its router and its experts keep on their own, plus the
experts' input rows and row weights (the experts' inputs) and the dispatch/combine index vectors:
no ``[N, H]`` tensor beyond the experts' input, in particular not the experts' output rows (the
weighted combine kept them for the routing weights' gradient)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch

from megatron_ext.layers.moe import MoELayer
from megatron_ext.parallel.groups import ParallelGroups, build_groups
from megatron_ext.parallel.topology import Topology

H, I, E, K, T = 16, 8, 8, 2, 10


@contextmanager
def saved_storages(exclude: Iterable[torch.Tensor]):
    """``{storage pointer: (nbytes, dtype)}`` of every tensor autograd saves inside, except the
    storages of ``exclude`` (parameters, the inputs)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict = {}

    def pack(t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key not in skip:
            seen[key] = (t.untyped_storage().nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def _bytes(seen: dict, floating: bool) -> int:
    return sum(n for n, dtype in seen.values() if dtype.is_floating_point == floating)


def _check(groups: ParallelGroups, dispatcher: str, recompute: bool, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    layer = MoELayer(H, E, K, I, groups, norm_topk_prob=True, dispatcher=dispatcher, dtype=dtype)
    layer.experts.recompute_activation = recompute
    x = torch.randn(T, H, dtype=dtype, requires_grad=True)
    params = list(layer.parameters())
    seen_io: dict = {}
    pre = layer.experts.register_forward_pre_hook(
        lambda m, args: seen_io.update(rows=args[0], counts=args[1], w=args[2]))
    post = layer.experts.register_forward_hook(lambda m, args, out: seen_io.update(out=out))
    kw = dict(token_counts=[T] * groups.moe_shard.size) if dispatcher == "all_to_all" else {}
    with saved_storages(params + [x]) as layer_saved:
        out = layer(x, **kw).hidden
    pre.remove(), post.remove()
    rows, w, y = seen_io["rows"], seen_io["w"], seen_io["out"]
    n = rows.shape[0]
    with saved_storages(params + [x]) as router_saved:
        layer.gate(x)
    r, wr = rows.detach().requires_grad_(), w.detach().requires_grad_()
    with saved_storages(params + [r, wr]) as experts_saved:
        layer.experts(r, seen_io["counts"], wr)
    what = f"{dispatcher} {groups.topology} recompute={recompute} {dtype}"
    assert y.untyped_storage().data_ptr() not in layer_saved, f"{what}: expert output kept"
    rows_key = rows.untyped_storage().data_ptr()
    wide = {k for k, (nb, dt) in layer_saved.items()
            if dt.is_floating_point and nb // dt.itemsize >= rows.numel()}
    assert wide == {rows_key}, f"{what}: [N, H]-sized saved tensors other than the expert input"
    float_want = (_bytes(router_saved, True) + _bytes(experts_saved, True)
                  + rows.untyped_storage().nbytes() + w.untyped_storage().nbytes())
    assert _bytes(layer_saved, True) == float_want, (what, _bytes(layer_saved, True), float_want)
    # index vectors: slot_row [T·k], token_index, flat_index (+ the exchange's perm/inverse)
    slots = T * K
    index_want = 8 * (slots + 2 * n if dispatcher == "local" else 3 * slots + 2 * n)
    index_got = _bytes(layer_saved, False) - _bytes(router_saved, False)
    assert index_got == index_want, (what, index_got, index_want)
    out.sum().backward()  # the counted graph is a working one
    return dict(what=what, rows=n, saved=_bytes(layer_saved, True) + _bytes(layer_saved, False))


def run(rank: int, world: int) -> list[dict]:
    """Both dispatchers on a moe_ep 2 world, float32 and bf16, with and without selective
    recompute; ``local`` also on one rank's own groups holding every expert."""
    groups = build_groups(Topology(world=world, moe_ep=world, moe_dp=1))
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for recompute in (False, True):
            out.append(_check(ParallelGroups.single_process(), "local", recompute, dtype))
            for dispatcher in ("local", "all_to_all"):
                out.append(_check(groups, dispatcher, recompute, dtype))
    return out
