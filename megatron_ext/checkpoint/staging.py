"""Publish a whole directory at once: write into a fresh staging directory beside the target, then
swap it in, so a target never mixes files of two saves (an old ``model.safetensors.index.json``
and its shards beside a new ``model.safetensors``: two loaders would read two different models).
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from typing import Iterator


def check_target(target: str, overwrite: bool, flag: str = "--overwrite") -> None:
    """``ValueError`` when ``target`` is a non-empty directory (or a file) and ``overwrite`` is
    not given: replacing someone's files needs consent."""
    if os.path.isfile(target):
        raise ValueError(f"output {target} is a file, not a directory")
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        raise ValueError(f"output {target} is not empty; pass {flag} to replace it as a whole "
                         f"(the new files are staged and swapped in) or choose a new directory")


@contextmanager
def staged_directory(target: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a fresh directory to write into; on success it replaces ``target`` whole (the old
    contents are removed only after the new directory is in place), on failure it is removed
    and ``target`` is untouched."""
    check_target(target, overwrite)
    target = os.path.normpath(target)
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    staging = f"{target}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    retired = f"{target}.replaced-{os.getpid()}"
    if os.path.isdir(target):
        os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)
