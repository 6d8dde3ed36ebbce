"""Per-file checksums of a published directory (training checkpoint or HF directory).

Written when a directory is published, checked before it is read: a flipped byte, a truncated
shard or a file swapped in from another save is an error naming the file, never a silently wrong
tensor (DCP and safetensors store no checksums of their own). ``manifest.json`` maps each file's
name to its size and SHA-256; files the manifest does not list are not checked (a directory
without a manifest, e.g. from an older version or another tool, is read unchecked).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional

MANIFEST_FILE = "manifest.json"
_CHUNK = 1 << 22


class ChecksumMismatch(ValueError):
    """A file of a published directory differs from what its manifest recorded."""


def file_digest(path: str) -> dict:
    """``{"bytes": size, "sha256": hex}`` of one file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            digest.update(block)
            size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


def digest_files(directory: str, names: Iterable[str]) -> dict[str, dict]:
    return {name: file_digest(os.path.join(directory, name)) for name in names}


def write_manifest(directory: str, digests: dict[str, dict]) -> str:
    """Write ``manifest.json`` (atomically) listing ``digests``; returns its path."""
    path = os.path.join(directory, MANIFEST_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": 1, "algorithm": "sha256", "files": dict(sorted(digests.items()))},
                  f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(directory: str) -> Optional[dict[str, dict]]:
    """The recorded ``{file: digest}`` of ``directory``, or ``None`` when it has no manifest."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            files = json.load(f)["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ChecksumMismatch(f"{path} is unreadable ({err})") from None
    return files


def verify_files(directory: str, recorded: dict[str, dict], names: Iterable[str]) -> None:
    """Check ``names`` (a subset of ``recorded``) against their digests; the first bad file is a
    :class:`ChecksumMismatch` naming it and what differs."""
    for name in names:
        path = os.path.join(directory, name)
        want = recorded[name]
        if not os.path.isfile(path):
            raise ChecksumMismatch(f"{path} is missing (listed in {MANIFEST_FILE})")
        size = os.path.getsize(path)
        if size != want.get("bytes"):
            raise ChecksumMismatch(f"{path} has {size} bytes, {MANIFEST_FILE} recorded "
                                   f"{want.get('bytes')} (truncated or replaced)")
        if file_digest(path)["sha256"] != want.get("sha256"):
            raise ChecksumMismatch(f"{path} is corrupted: its SHA-256 differs from the one "
                                   f"recorded in {MANIFEST_FILE} at save time")


def verify_directory(directory: str) -> bool:
    """Verify every file the manifest of ``directory`` lists; ``False`` when there is none."""
    recorded = read_manifest(directory)
    if recorded is None:
        return False
    verify_files(directory, recorded, sorted(recorded))
    return True
