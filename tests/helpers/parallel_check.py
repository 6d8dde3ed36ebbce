"""Helpers for layer tests: load a parallel layer from a single-process reference's global weights
(through each parameter's ParamSpec), and compare its gradients after summing them over the
ParamSpec's ``grad_sync`` axes — what the real gradient sync will do."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.parallel.param_meta import get_spec


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0,
                 what: str = "") -> None:
    """``|actual - expected| <= atol + rtol·|expected|`` elementwise, same shape and dtype.

    Used inside spawned ranks instead of ``torch.testing.assert_close``, whose first call imports
    sympy (seconds per rank on a 2-core machine)."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise AssertionError(f"{what}: got {tuple(actual.shape)} {actual.dtype}, expected "
                             f"{tuple(expected.shape)} {expected.dtype}")
    diff = (actual.detach() - expected.detach()).abs()
    bound = atol + rtol * expected.detach().abs()
    if not bool((diff <= bound).all()):
        worst = int(torch.argmax(diff - bound))
        raise AssertionError(f"{what}: {int((diff > bound).sum())}/{diff.numel()} elements differ; "
                             f"max abs diff {float(diff.max()):.3g} (atol={atol}, rtol={rtol}) at "
                             f"flat index {worst}")


def load_from_reference(layer: nn.Module, reference: nn.Module) -> None:
    """Copy every parameter's slice of the reference's (global) tensor into ``layer``."""
    ref = dict(reference.named_parameters())
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name not in ref:
                raise KeyError(f"parameter {name} has no reference tensor")
            p.copy_(get_spec(p).take_local(ref[name].detach()))


def synced_grad(p: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """``p.grad`` (zeros if None) summed over the spec's grad_sync axes (sequentially)."""
    g = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
    for axis in get_spec(p).grad_sync:
        group = groups.axis(axis)
        if not group.is_trivial:
            dist.all_reduce(g, group=group.group)
    return g


def assert_grads_match(layer: nn.Module, reference: nn.Module, groups: ParallelGroups, *,
                       atol: float, rtol: float = 0.0, what: str = "",
                       skip: Iterable[str] = ()) -> None:
    """Every parameter's synced gradient equals its slice of the reference gradient."""
    ref = dict(reference.named_parameters())
    for name, p in layer.named_parameters():
        if name in skip:
            continue
        got = synced_grad(p, groups)
        r = ref[name].grad
        expect = torch.zeros_like(ref[name]) if r is None else r
        spec = get_spec(p)
        expect = expect[spec.global_slices()]
        assert_close(spec.real_part(got), expect, atol=atol, rtol=rtol,
                     what=f"{what} grad of {name}")
        padding = got.clone()
        spec.real_part(padding).zero_()
        assert not padding.any(), f"{what}: padding rows of {name} got a gradient"


def sum_over(t: torch.Tensor, group_axis: Optional[str], groups: ParallelGroups) -> torch.Tensor:
    """Sum a tensor over one axis (test-side reduction, no autograd)."""
    t = t.detach().clone()
    if group_axis is not None and not groups.axis(group_axis).is_trivial:
        dist.all_reduce(t, group=groups.axis(group_axis).group)
    return t
