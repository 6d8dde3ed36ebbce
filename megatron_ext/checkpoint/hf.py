"""Hugging Face checkpoints (``config.json`` + safetensors, single file or sharded with
``model.safetensors.index.json``) to and from any parallel layout.

* **Load**: no collectives. Each rank checks the whole file set against the model's expected HF
  tensors (missing, unexpected, mis-shaped — each named with both shapes) and then reads only the
  slices its parameters hold (``safe_open(...).get_slice``), as their :class:`ParamSpec` and
  :class:`HFSource` say.
* **Save**: layer by layer, every piece of every parameter is sent once to global rank 0 (the
  replica whose coordinate is 0 on every ``grad_sync`` axis sends it), which assembles the global
  tensors, splits them into HF tensors (per-expert keys, as ``transformers`` writes them) and writes
  each shard file as soon as it is complete, so rank 0 never holds much more than one shard.
  The result of rank 0 is broadcast, so an error fails every rank instead of hanging them.

A model plugs in through three methods (see :class:`HFConvertible`); megatron_ext does not import
``models``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Iterable, Iterator, Optional, Protocol, Union

import torch
import torch.distributed as dist

from megatron_ext.checkpoint.hf_sources import HFSource
from megatron_ext.checkpoint.manifest import (MANIFEST_FILE, digest_files, verify_directory,
                                              write_manifest)
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.parallel.param_meta import ParamSpec, get_spec

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


class HFConvertible(Protocol):
    """What a model provides to be loaded from / saved to an HF directory."""

    def hf_sources(self) -> dict[str, HFSource]:
        """For each of this rank's parameter names (``named_parameters``), its HF source."""

    def hf_expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the whole model's HF checkpoint holds (all pipeline stages), with shape."""

    def hf_config_dict(self) -> dict:
        """The HF ``config.json`` contents."""

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]: ...


# ---------------------------------------------------------------------------- reading
class HFCheckpointReader:
    """The tensors of one HF directory: names, shapes, dtypes and sliced reads."""

    def __init__(self, path: str, *, verify: bool = True):
        from safetensors import safe_open

        self.path = path
        index_path = os.path.join(path, INDEX_FILE)
        single_path = os.path.join(path, SINGLE_FILE)
        if os.path.isfile(index_path) and os.path.isfile(single_path):
            raise ValueError(f"HF directory {path!r} holds both {SINGLE_FILE} and {INDEX_FILE} "
                             f"(files of two different saves?); loaders disagree on which one "
                             f"counts: remove the stale one")
        if verify:  # before any byte is trusted (a converted directory has a manifest)
            verify_directory(path)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    index = json.load(f)
                self.weight_map: dict[str, str] = dict(index["weight_map"])
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{index_path} is not a safetensors index (needs a "
                                 f"'weight_map' of tensor -> file): {err}") from None
        elif os.path.isfile(single_path):
            self.weight_map = {}
        else:
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in HF directory {path!r}")
        files = sorted(set(self.weight_map.values())) or [SINGLE_FILE]
        self._handles = {}
        for name in files:
            file_path = os.path.join(path, name)
            if not os.path.isfile(file_path):
                raise FileNotFoundError(f"{INDEX_FILE} in {path!r} names {name}, which is missing")
            try:
                self._handles[name] = safe_open(file_path, framework="pt")
            except Exception as err:  # noqa: BLE001 - SafetensorError: header/size problems
                raise ValueError(f"{file_path} is not a readable safetensors file "
                                 f"({' '.join(str(err).split())})") from None
        if not self.weight_map:
            self.weight_map = {k: SINGLE_FILE for k in self._handles[SINGLE_FILE].keys()}
        for name, handle in self._handles.items():
            in_file = set(handle.keys())
            listed = {k for k, v in self.weight_map.items() if v == name}
            if listed - in_file:
                raise ValueError(f"{INDEX_FILE} lists {sorted(listed - in_file)[:5]} in {name}, "
                                 f"but that file does not hold them")

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def _slice(self, key: str):
        if key not in self.weight_map:
            raise KeyError(f"tensor {key} is not in the checkpoint {self.path!r}")
        return self._handles[self.weight_map[key]].get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def read(self, key: str, slices: tuple[slice, ...]) -> torch.Tensor:
        """Only the block ``slices`` of tensor ``key`` (``()`` for a scalar)."""
        block = self._slice(key)
        return block[slices] if slices else block[:]

    def read_finite(self, key: str, slices: tuple[slice, ...]) -> torch.Tensor:
        """:meth:`read`, refusing NaN/inf (corrupted bytes; weights are never meant to hold
        them) with the tensor's name."""
        block = self.read(key, slices)
        if block.is_floating_point() and not bool(torch.isfinite(block).all()):
            raise ValueError(f"tensor {key} in {os.path.join(self.path, self.weight_map[key])} "
                             f"holds NaN or inf values")
        return block

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "HFCheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_checkpoint_tensors(reader: HFCheckpointReader, expected: dict[str, tuple[int, ...]],
                             *, strict: bool = True) -> None:
    """Raise ``ValueError`` naming every missing or mis-shaped tensor (and, when ``strict``,
    every tensor the model has no place for)."""
    have = set(reader.keys())
    problems = []
    missing = [k for k in expected if k not in have]
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:10])}"
                        + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""))
    for key, shape in expected.items():
        if key in have and reader.shape(key) != tuple(shape):
            problems.append(f"tensor {key}: checkpoint shape {reader.shape(key)} but the model "
                            f"expects {tuple(shape)}")
    unexpected = sorted(have - set(expected))
    if unexpected and strict:
        problems.append(f"tensors the model has no place for: {', '.join(unexpected[:10])}"
                        + (f" (and {len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
    if problems:
        raise ValueError(f"HF checkpoint {reader.path!r} does not fit the model:\n  "
                         + "\n  ".join(problems))


def load_params(params: Iterable[tuple[str, torch.Tensor]], sources: dict[str, HFSource],
                reader: HFCheckpointReader) -> int:
    """Copy each parameter's own slice from the checkpoint; returns how many were loaded."""
    count = 0
    for name, param in params:
        if name not in sources:
            raise ValueError(f"parameter {name} has no HF source (model.hf_sources() misses it)")
        spec, source = get_spec(param), sources[name]
        if tuple(source.shape) != tuple(spec.global_shape):
            raise ValueError(f"parameter {name}: its HF source {source.keys()[:3]} makes a global "
                             f"tensor of shape {tuple(source.shape)} but the parameter spec says "
                             f"{tuple(spec.global_shape)}")
        block = source.read(reader.read_finite, spec.global_slices())
        real = spec.real_part(param)
        if tuple(block.shape) != tuple(real.shape):
            raise ValueError(f"parameter {name}: read a block of shape {tuple(block.shape)} from "
                             f"the checkpoint, local parameter has {tuple(real.shape)}")
        with torch.no_grad():
            if real.shape != param.shape:
                param.zero_()  # padding (vocabulary rows the checkpoint does not have)
            real.copy_(block)
        count += 1
    return count


def load_hf_checkpoint(model: HFConvertible, path: str, *, strict: bool = True) -> None:
    """Load ``path`` into ``model`` (this rank's slices only; no collectives)."""
    with HFCheckpointReader(path) as reader:
        check_checkpoint_tensors(reader, model.hf_expected_shapes(), strict=strict)
        load_params(model.named_parameters(), model.hf_sources(), reader)


# ---------------------------------------------------------------------------- shard plans
def shard_plan(expected: dict[str, tuple[int, ...]], dtype: torch.dtype,
               max_shard_bytes: int) -> dict[str, str]:
    """``{tensor: file}`` in ``transformers``' naming; tensors in ``expected``'s order, a new
    shard when the next tensor would overflow ``max_shard_bytes`` (huggingface_hub's rule)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {k: itemsize * _numel(s) for k, s in expected.items()}
    if sum(sizes.values()) <= max_shard_bytes:
        return {k: SINGLE_FILE for k in expected}
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    n = len(shards)
    return {k: f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            for i, keys in enumerate(shards) for k in keys}


def shard_plan_like(path: str) -> dict[str, str]:
    """The ``{tensor: file}`` assignment of an existing HF directory (to write identical files)."""
    with HFCheckpointReader(path) as reader:
        return dict(reader.weight_map)


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r}: use bytes or e.g. '5GB', '200MB', '20KB'")
    return int(float(match.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[match.group(2)])


# ---------------------------------------------------------------------------- saving
def _bucket_of(key: str) -> int:
    """Save order: layer ``N`` -> ``N``; tensors outside the layers -> -1 (sent first)."""
    match = _LAYER_RE.search(key)
    return int(match.group(1)) if match else -1


def _sends_piece(spec: ParamSpec, groups: ParallelGroups) -> bool:
    """One holder per distinct piece: the replica at coordinate 0 of every grad-sync axis."""
    return all(groups.axis(axis).rank == 0 for axis in spec.grad_sync)


def _config_dtype(config: dict) -> Optional[torch.dtype]:
    name = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else None


def save_hf_checkpoint(model: HFConvertible, path: str, groups: Optional[ParallelGroups] = None,
                       *, dtype: Optional[torch.dtype] = None, shard_like: Optional[str] = None,
                       max_shard_size: Union[int, str] = "5GB",
                       copy_files_from: Optional[str] = None) -> None:
    """Write ``model`` (any layout) as an HF directory. Collective over the whole world when
    ``torch.distributed`` is initialised with more than one rank; global rank 0 writes.

    * ``dtype``: of the written tensors; default the ``dtype`` in the model's HF config, else the
      parameters' dtype.
    * ``shard_like``: an HF directory whose file assignment to reuse (byte-identical round
      trips); otherwise shards of at most ``max_shard_size`` in the model's tensor order.
    * ``copy_files_from``: copy its other files (tokenizer, generation config) alongside.
    """
    groups = groups or ParallelGroups.single_process()
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    expected = model.hf_expected_shapes()
    config = model.hf_config_dict()
    sources = model.hf_sources()
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in sources]
    if missing:  # same on every rank's stage replicas; raised before any collective
        raise ValueError(f"parameters without an HF source: {missing[:5]}")
    if dtype is None:
        dtype = _config_dtype(config) or next(iter(params.values())).dtype

    buckets = sorted({_bucket_of(k) for k in expected})
    mine: dict[int, list[str]] = {b: [] for b in buckets}
    for name, param in params.items():
        if _sends_piece(get_spec(param), groups):
            mine[_bucket_of(sources[name].keys()[0])].append(name)

    writer: Optional[_ShardWriter] = None
    error: Optional[str] = None
    if rank == 0:  # a failure here must not leave the other ranks waiting in the gathers
        try:
            writer = _ShardWriter(path, expected, dtype, config, shard_like, max_shard_size)
        except Exception as exc:  # noqa: BLE001 - reported to every rank below
            error = f"{type(exc).__name__}: {exc}"
    for bucket in buckets:
        # the source travels with the piece: rank 0 may hold no such parameter (other stages)
        pieces = [(n, get_spec(params[n]), sources[n],
                   get_spec(params[n]).real_part(params[n].detach()).to("cpu"))
                  for n in mine[bucket]]
        if distributed:
            gathered: Optional[list] = [None] * dist.get_world_size() if rank == 0 else None
            dist.gather_object(pieces, gathered, dst=0)
        else:
            gathered = [pieces]
        if writer is not None and error is None:
            try:
                writer.add(gathered)
            except Exception as exc:  # noqa: BLE001 - reported to every rank below
                error = f"{type(exc).__name__}: {exc}"
    if writer is not None and error is None:
        try:
            writer.finish()
            if copy_files_from:
                _copy_other_files(copy_files_from, path)
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
    if distributed:
        status = [error]
        dist.broadcast_object_list(status, src=0)
        error = status[0]
    if error is not None:
        raise RuntimeError(f"saving the HF checkpoint to {path!r} failed on rank 0: {error}")


class _ShardWriter:
    """Rank 0's side of a save: assemble pieces into global tensors, split them into HF tensors,
    write each shard file once all its tensors are present."""

    def __init__(self, path: str, expected: dict[str, tuple[int, ...]], dtype: torch.dtype,
                 config: dict, shard_like: Optional[str], max_shard_size: Union[int, str]):
        self.path, self.expected, self.dtype, self.config = path, expected, dtype, config
        self.plan = shard_plan_like(shard_like) if shard_like else \
            shard_plan(expected, dtype, _parse_size(max_shard_size))
        if set(self.plan) != set(expected):
            extra, lacking = set(self.plan) - set(expected), set(expected) - set(self.plan)
            raise ValueError(f"shard plan from {shard_like!r} does not match the model: "
                             f"extra {sorted(extra)[:5]}, missing {sorted(lacking)[:5]}")
        self.files: dict[str, list[str]] = {}
        for key, file in self.plan.items():
            self.files.setdefault(file, []).append(key)
        self.ready: dict[str, torch.Tensor] = {}
        self.written: set[str] = set()
        os.makedirs(path, exist_ok=True)

    def add(self, gathered: list) -> None:
        by_name: dict[str, tuple[ParamSpec, HFSource, dict[tuple, torch.Tensor]]] = {}
        for rank_pieces in gathered:
            for name, spec, source, tensor in rank_pieces:
                entry = by_name.setdefault(name, (spec, source, {}))
                if entry[0].global_shape != spec.global_shape:
                    raise ValueError(f"parameter {name}: ranks disagree on its global shape "
                                     f"({entry[0].global_shape} vs {spec.global_shape})")
                key = tuple((s.start, s.stop) for s in spec.global_slices())  # slices: unhashable
                entry[2].setdefault(key, tensor)
        for name, (spec, source, pieces) in by_name.items():
            full = torch.empty(spec.global_shape, dtype=self.dtype)
            covered = 0
            for bounds, tensor in pieces.items():
                full[tuple(slice(a, b) for a, b in bounds)] = tensor.to(self.dtype)
                covered += tensor.numel()
            if covered != full.numel():
                raise ValueError(f"parameter {name}: the pieces sent cover {covered} of "
                                 f"{full.numel()} elements (a shard holder did not send)")
            for key, tensor in source.split(full).items():
                if key not in self.expected:
                    raise ValueError(f"parameter {name} maps to {key}, which the model's HF "
                                     f"tensor list does not contain")
                if tuple(tensor.shape) != tuple(self.expected[key]):
                    raise ValueError(f"tensor {key}: assembled shape {tuple(tensor.shape)} but "
                                     f"expected {tuple(self.expected[key])}")
                if key not in self.ready and key not in self._written_keys():
                    self.ready[key] = tensor.contiguous().clone()
        self._write_complete_files()

    def _written_keys(self) -> set[str]:
        return {k for f in self.written for k in self.files[f]}

    def _write_complete_files(self) -> None:
        from safetensors.torch import save_file

        for file, keys in self.files.items():
            if file in self.written or not all(k in self.ready for k in keys):
                continue
            tmp = os.path.join(self.path, f".{file}.tmp")
            save_file({k: self.ready[k] for k in keys}, tmp, metadata={"format": "pt"})
            os.replace(tmp, os.path.join(self.path, file))
            for k in keys:
                del self.ready[k]
            self.written.add(file)

    def finish(self) -> None:
        lacking = [f for f in self.files if f not in self.written]
        if lacking:
            keys = [k for f in lacking for k in self.files[f] if k not in self.ready]
            raise ValueError(f"no parameter provided HF tensors {keys[:10]}")
        if len(self.files) > 1:
            numel = sum(_numel(s) for s in self.expected.values())
            itemsize = torch.empty((), dtype=self.dtype).element_size()
            index = {"metadata": {"total_parameters": numel, "total_size": numel * itemsize},
                     "weight_map": dict(sorted(self.plan.items()))}
            _write_text(os.path.join(self.path, INDEX_FILE),
                        json.dumps(index, indent=2, sort_keys=True) + "\n")
        _write_text(os.path.join(self.path, CONFIG_FILE),
                    json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        listed = sorted(self.files) + [CONFIG_FILE] + ([INDEX_FILE] if len(self.files) > 1 else [])
        write_manifest(self.path, digest_files(self.path, listed))


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _copy_other_files(src: str, dst: str) -> None:
    skip = {CONFIG_FILE, INDEX_FILE, MANIFEST_FILE}
    for name in os.listdir(src):
        full = os.path.join(src, name)
        if name in skip or name.endswith(".safetensors") or not os.path.isfile(full):
            continue
        shutil.copyfile(full, os.path.join(dst, name))
