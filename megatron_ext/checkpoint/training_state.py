"""Layout-independent training checkpoints with ``torch.distributed.checkpoint`` (DCP).

Every tensor is stored as its *global* tensor: each rank contributes the chunk its ``ParamSpec``
says it holds (offsets from ``global_slices()``), DCP's global planning drops the duplicate chunks
of replicas and checks that the chunks tile the tensor. Loading asks, per rank, for the chunk of the
*current* layout, and DCP reads whichever saved chunks overlap it, so a checkpoint written with
attn_tp 2 loads into pp 2 × attn_cp 2 or a single process. The planners below are the only glue:
plain tensors plus a table of (global shape, offsets) — no DeviceMesh/DTensor, so the same code
runs on gloo (CPU) and NCCL.

A checkpoint holds parameters (``model/<name>``), Adam's moments (``optim/<name>/exp_avg``,
``.../exp_avg_sq``), the training state (step, consumed samples, schedule, config; one pickled
object) and each rank's RNG states (``rng/rank_<r>``; restored only when the same rank exists).

Publishing is atomic: ranks write into ``step_<N>.partial/``; once DCP has written its metadata
(after every rank finished writing), rank 0 renames the directory to ``step_<N>``. A crash at any
point leaves either no ``step_<N>`` or a complete one; ``latest_checkpoint`` only considers
complete ones, and leftovers are removed by the next save. Before the rename, every rank hashes
its share of the files and rank 0 writes ``manifest.json`` (per-file SHA-256) and
``lineage.json`` (save order, see ``checkpoint_dirs``); loads verify the files first (each rank a
share), so a corrupted or truncated file is an error naming it on every rank, never NaN weights.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (LoadItemType, LoadPlan, ReadItem, SavePlan,
                                                  TensorWriteData, WriteItem, WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_ext.checkpoint.checkpoint_dirs import (LINEAGE_FILE, PARTIAL_SUFFIX, STEP_DIR,
                                                     checkpoint_path, complete_checkpoints,
                                                     is_complete, latest_checkpoint,
                                                     next_lineage, resolve_resume)
from megatron_ext.checkpoint.manifest import (MANIFEST_FILE, ChecksumMismatch, digest_files,
                                              read_manifest, verify_directory, verify_files,
                                              write_manifest)
from megatron_ext.parallel.param_meta import ParamSpec, get_spec

__all__ = ["STEP_DIR", "PARTIAL_SUFFIX", "checkpoint_path", "complete_checkpoints",
           "latest_checkpoint", "resolve_resume", "save_checkpoint", "load_checkpoint",
           "read_train_state", "load_global_tensors", "collect_shards", "Shard",
           "ChecksumMismatch", "verify_checkpoint"]

TRAIN_STATE_KEY = "train_state"


@dataclass(frozen=True)
class Shard:
    """A local tensor (never padding: see ``ParamSpec.real_part``) and where it sits in its
    global tensor."""

    tensor: torch.Tensor
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]

    @classmethod
    def of(cls, tensor: torch.Tensor, spec: ParamSpec) -> "Shard":
        if tuple(tensor.shape) != spec.local_shape:
            raise ValueError(f"tensor {spec.name or '?'} has shape {tuple(tensor.shape)}, its spec "
                             f"says local shape {spec.local_shape}")
        offsets = tuple(s.start for s in spec.global_slices())
        return cls(spec.real_part(tensor), tuple(spec.global_shape), offsets)

    @property
    def chunk(self) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=torch.Size(self.offsets),
                                    sizes=torch.Size(self.tensor.shape))

    @classmethod
    def of_flat(cls, flat: torch.Tensor, spec: ParamSpec, local_start: int) -> list["Shard"]:
        """A contiguous piece of the flattened local tensor (elements ``[local_start, local_start
        + len(flat))``, e.g. the slice a distributed optimizer owns) as the rectangular chunks of
        the global tensor it covers (views of ``flat``). Padding (a padded vocabulary's rows past
        the real ones) is cut off: it is never stored."""
        base = tuple(s.start for s in spec.global_slices())
        real = tuple(s.stop - s.start for s in spec.global_slices())  # from local index 0
        out = []
        for lo, hi, offsets, sizes in flat_range_chunks(spec.local_shape, local_start,
                                                        local_start + flat.numel()):
            view = flat[lo - local_start:hi - local_start].view(sizes)
            view = view[tuple(slice(0, max(0, min(o + z, r) - o))
                              for o, z, r in zip(offsets, sizes, real))]
            if view.numel():
                out.append(cls(view, tuple(spec.global_shape),
                               tuple(b + o for b, o in zip(base, offsets))))
        return out


def flat_range_chunks(shape: tuple[int, ...], start: int, stop: int
                      ) -> list[tuple[int, int, tuple[int, ...], tuple[int, ...]]]:
    """Row-major elements ``[start, stop)`` of a tensor of ``shape`` as ``(lo, hi, offsets,
    sizes)`` rectangles (at most ``2·ndim - 1``): a partial leading row, whole rows, a partial
    trailing row, each split the same way one dimension down."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [(start, stop, (start,) * len(shape), (stop - start,) * len(shape))]
    row = 1
    for n in shape[1:]:
        row *= n
    first, last = start // row, (stop - 1) // row
    if first == last:
        inner = flat_range_chunks(shape[1:], start - first * row, stop - first * row)
        return [(lo + first * row, hi + first * row, (first,) + o, (1,) + z)
                for lo, hi, o, z in inner]
    out = []
    whole_lo = -(-start // row) * row
    whole_hi = (stop // row) * row
    out += flat_range_chunks(shape, start, whole_lo)
    if whole_hi > whole_lo:
        out.append((whole_lo, whole_hi, (whole_lo // row,) + (0,) * (len(shape) - 1),
                    ((whole_hi - whole_lo) // row,) + tuple(shape[1:])))
    out += flat_range_chunks(shape, max(whole_hi, whole_lo), stop)
    return out


# ---------------------------------------------------------------------- planners
class ShardSavePlanner(DefaultSavePlanner):
    """Writes each :class:`Shard` as a chunk of its global tensor; other values as pickles."""

    def __init__(self, shards: dict[str, list[Shard]]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.shards = shards

    def create_local_plan(self) -> SavePlan:
        items = []
        for fqn, obj in self.state_dict.items():
            if fqn in self.shards:
                for shard in self.shards[fqn]:
                    items.append(WriteItem(
                        index=MetadataIndex(fqn, torch.Size(shard.offsets)),
                        type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(
                            chunk=shard.chunk,
                            properties=TensorProperties.create_from_tensor(shard.tensor),
                            size=torch.Size(shard.global_shape))))
            else:
                items.append(WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO))
        self.plan = SavePlan(items)
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> Any:
        if index.fqn in self.shards:
            for shard in self.shards[index.fqn]:
                if tuple(shard.offsets) == tuple(index.offset):
                    return shard.tensor.detach().cpu().contiguous()
            raise KeyError(f"no local chunk of {index.fqn} at {tuple(index.offset)}")
        return self.state_dict[index.fqn]


class ShardLoadPlanner(DefaultLoadPlanner):
    """Reads, for each :class:`Shard`, the part of the saved global tensor the shard covers."""

    def __init__(self, shards: dict[str, list[Shard]]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.shards = shards

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        saved = self.metadata.state_dict_metadata
        check_loadable(saved, self.shards, [k for k in self.state_dict if k not in self.shards])
        requests: list[ReadItem] = []
        for fqn in self.state_dict:
            if fqn in self.shards:
                requests += create_read_items_for_chunk_list(
                    fqn, saved[fqn], [s.chunk for s in self.shards[fqn]])
            else:
                index = MetadataIndex(fqn)
                requests.append(ReadItem(type=LoadItemType.BYTE_IO, dest_index=index,
                                         dest_offsets=torch.Size((0,)), storage_index=index,
                                         storage_offsets=torch.Size((0,)),
                                         lengths=torch.Size((0,))))
        return LoadPlan(requests)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.shards[index.fqn][index.index].tensor

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=False)


def check_loadable(saved: dict, shards: dict[str, list["Shard"]], objects: list[str]) -> None:
    """``ValueError`` naming the entry if the checkpoint lacks one or its global shape differs
    (checked before DCP starts reading, so the message is not buried in a DCP exception)."""
    for fqn in list(shards) + list(objects):
        if fqn not in saved:
            raise ValueError(f"checkpoint has no entry {fqn!r} (saved from another model?)")
    for fqn, chunks in shards.items():
        if not chunks:
            continue
        shard, md = chunks[0], saved[fqn]
        if not isinstance(md, TensorStorageMetadata):
            raise ValueError(f"checkpoint entry {fqn!r} is not a tensor")
        if tuple(md.size) != shard.global_shape:
            raise ValueError(f"checkpoint tensor {fqn!r} has global shape {tuple(md.size)}, the "
                             f"model expects {shard.global_shape}")


# ---------------------------------------------------------------------- state
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def param_pieces(named_params: list[tuple[str, torch.nn.Parameter]]
                 ) -> list[tuple[str, ParamSpec, int, torch.Tensor]]:
    """``model/<name>`` pieces of whole local parameters (for :func:`collect_shards`)."""
    return [(f"model/{name}", get_spec(p), 0, p.data) for name, p in named_params]


def collect_shards(pieces: list[tuple[str, ParamSpec, int, torch.Tensor]]
                   ) -> dict[str, list[Shard]]:
    """``{key: chunks}`` from ``(key, spec, local flat start, flat tensor)`` pieces (the
    optimizer's ``checkpoint_tensors()``: ``model/<name>`` main weights, ``optim/<name>/<moment>``
    Adam's state); a key may come in several pieces."""
    shards: dict[str, list[Shard]] = {}
    for key, spec, start, flat in pieces:
        shards.setdefault(key, []).extend(Shard.of_flat(flat.reshape(-1), spec, start))
    return shards


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _dcp(fn, *args, **kwargs):
    """``dcp.save`` / ``dcp.load``; one-process runs pass ``no_dist`` (DCP's warning about
    assuming a single process is expected there, so it is silenced)."""
    no_dist = not dist.is_initialized()
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return fn(*args, no_dist=no_dist, **kwargs)


# ---------------------------------------------------------------------- verification
def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _share_of_files(directory: str) -> list[str]:
    """This rank's share of the files to hash (every rank lists the same directory)."""
    names = sorted(n for n in os.listdir(directory) if n != MANIFEST_FILE)
    return names[_rank()::_world()]


def verify_checkpoint(path: str, *, collective: bool = False) -> None:
    """Check the files of checkpoint ``path`` against its manifest. ``collective``: every rank
    of the world checks a share and all learn the first failure (call on every rank)."""
    if not collective or _world() == 1:
        verify_directory(path)
        return
    error = None
    recorded = read_manifest(path)
    if recorded is not None:
        try:
            verify_files(path, recorded, sorted(recorded)[_rank()::_world()])
        except ChecksumMismatch as err:
            error = str(err)
    errors: list = [None] * _world()
    dist.all_gather_object(errors, error)
    failed = [e for e in errors if e]
    if failed:
        raise ChecksumMismatch(failed[0])


def _publish_manifest(partial: str) -> None:
    """Every rank hashes a share of ``partial``'s files; rank 0 writes the manifest."""
    digests = digest_files(partial, _share_of_files(partial))
    if _world() > 1:
        gathered: Optional[list] = [None] * _world() if _rank() == 0 else None
        dist.gather_object(digests, gathered, dst=0)
        if _rank() == 0:
            digests = {k: v for part in gathered for k, v in part.items()}
    if _rank() == 0:
        write_manifest(partial, digests)


def _read_error(path: str, err: BaseException) -> ValueError:
    """A DCP read failure (``EOFError``, unpickling errors, ...) as one line naming ``path``."""
    text = " ".join(str(err).split())[:300]
    return ValueError(f"reading checkpoint {path} failed ({type(err).__name__}: {text}); it has "
                      f"no manifest to tell which file is damaged" if read_manifest(path) is None
                      else f"reading checkpoint {path} failed ({type(err).__name__}: {text})")


# ---------------------------------------------------------------------- save / load
def save_checkpoint(root: str, step: int, shards: dict[str, list[Shard]], train_state: dict,
                    keep: int = 2, storage_writer: Optional[dcp.StorageWriter] = None, *,
                    run_id: str = "", resumed_from: Optional[str] = None) -> str:
    """Write and publish ``step_<step>`` (collective over the world). Returns its path. Rotation
    keeps the ``keep`` most recently *saved* checkpoints (``checkpoint_dirs``), this one
    included."""
    final = checkpoint_path(root, step)
    partial = final + PARTIAL_SUFFIX
    rank = _rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of interrupted saves
            if name.endswith(PARTIAL_SUFFIX):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(partial)
        lineage = next_lineage(root, step, run_id, time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               resumed_from)
        with open(os.path.join(partial, LINEAGE_FILE), "w", encoding="utf-8") as f:
            json.dump(lineage, f)
    _barrier()
    state_dict: dict[str, Any] = {k: (s[0].tensor if s else None) for k, s in shards.items()}
    state_dict[TRAIN_STATE_KEY] = train_state
    state_dict[f"rng/rank_{rank}"] = rng_state()
    writer = storage_writer or dcp.FileSystemWriter(partial, single_file_per_rank=True)
    _dcp(dcp.save, state_dict, storage_writer=writer, planner=ShardSavePlanner(shards))
    # dcp.save returns on every rank only after the coordinator wrote .metadata
    _publish_manifest(partial)
    if rank == 0:
        if os.path.isdir(final):  # re-save of a published step (e.g. resumed at it): replace
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(root)
        for _, old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str, shards: dict[str, list[Shard]]) -> dict:
    """Load ``shards`` in place from the checkpoint at ``path`` (any layout) and restore this
    rank's RNG state when the checkpoint has one for it. Returns the training state."""
    if not is_complete(path):
        raise ValueError(f"{path!r} is not a complete checkpoint (no .metadata)")
    verify_checkpoint(path, collective=True)
    reader = dcp.FileSystemReader(path)
    saved = _read_metadata(reader, path)
    rng_key = f"rng/rank_{_rank()}"
    state_dict: dict[str, Any] = {k: (s[0].tensor if s else None) for k, s in shards.items()}
    state_dict[TRAIN_STATE_KEY] = None
    if rng_key in saved:
        state_dict[rng_key] = None
    check_loadable(saved, shards, [TRAIN_STATE_KEY])
    with torch.no_grad():
        try:
            _dcp(dcp.load, state_dict, storage_reader=reader, planner=ShardLoadPlanner(shards))
        except ValueError:
            raise
        except Exception as err:  # noqa: BLE001 - DCP wraps EOFError & co. per rank
            raise _read_error(path, err) from None
    if state_dict.get(rng_key) is not None:
        set_rng_state(state_dict[rng_key])
    return state_dict[TRAIN_STATE_KEY]


def _read_metadata(reader: dcp.FileSystemReader, path: str) -> dict:
    try:
        return reader.read_metadata().state_dict_metadata
    except Exception as err:  # noqa: BLE001 - a truncated .metadata is a bare EOFError
        raise _read_error(path, err) from None


def _load_one_process(path: str, state_dict: dict, shards: dict[str, list[Shard]]) -> None:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state_dict, storage_reader=dcp.FileSystemReader(path),
                     planner=ShardLoadPlanner(shards), no_dist=True)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001
        raise _read_error(path, err) from None


def read_train_state(path: str) -> dict:
    """The training state of a checkpoint, read in one process (no collectives, unverified:
    call :func:`verify_checkpoint` first where the files matter)."""
    state_dict: dict[str, Any] = {TRAIN_STATE_KEY: None}
    _load_one_process(path, state_dict, {})
    return state_dict[TRAIN_STATE_KEY]


def load_global_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every saved tensor as a full global tensor (one process; for tests and conversion)."""
    metadata = _read_metadata(dcp.FileSystemReader(path), path)
    shards = {k: [Shard(torch.empty(tuple(md.size), dtype=md.properties.dtype), tuple(md.size),
                        (0,) * len(md.size))]
              for k, md in metadata.items() if isinstance(md, TensorStorageMetadata)}
    state_dict: dict[str, Any] = {k: s[0].tensor for k, s in shards.items()}
    _load_one_process(path, state_dict, shards)
    return {k: s[0].tensor for k, s in shards.items()}
