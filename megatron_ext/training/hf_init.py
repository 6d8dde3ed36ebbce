"""Where a run's initial weights come from, decided before any process group: an HF directory's
weights are loaded whole or the launch is refused — never a silent random initialisation with the
same banner.

* ``--model <HF dir>`` (``init_from_hf`` true, the default): the directory must hold weights, every
  tensor of the (overridden) model must be there with its shape, and overrides may not change
  any shape (``router_aux_loss_coef`` or dropout keep the weights; ``hidden_size`` is refused with
  the field's name).
* ``--init-from-hf false``, a preset or a bare ``config.json``: random initialisation from the seed.
"""
from __future__ import annotations

import os
from typing import Optional

from megatron_ext.checkpoint.hf import (INDEX_FILE, SINGLE_FILE, HFCheckpointReader,
                                        check_checkpoint_tensors)
from megatron_ext.models.hf_keys import hf_tensor_shapes


def _shape_changes(before: dict, after: dict) -> list[str]:
    changes = [f"{k}: {before.get(k)} -> {after[k]}" for k in after
               if before.get(k) != after[k]]
    return changes + [f"{k}: {before[k]} -> absent" for k in before if k not in after]


def _fields_changing_shapes(base, overrides: dict) -> list[str]:
    """The override fields that alone change a weight shape of ``base``."""
    shapes = hf_tensor_shapes(base)
    culprits = []
    for key, value in overrides.items():
        single = {key: value}
        if key == "num_layers" and "sparse_layers" not in overrides:
            single["sparse_layers"] = [base.sparse_layers[0]] * int(value)
        try:
            changed = _shape_changes(shapes, hf_tensor_shapes(base.replace(**single)))
        except (TypeError, ValueError):  # only valid together with other fields
            changed = ["?"]
        if changed:
            culprits.append(key)
    return culprits


def hf_init_source(model: str, init_from_hf: bool, model_config, overrides: dict
                   ) -> Optional[str]:
    """The HF directory to load initial weights from (``None``: random init); ``ValueError``
    naming the directory, the missing file/tensor or the override field otherwise."""
    from megatron_ext.models.config import load_model_config

    if not init_from_hf or not os.path.isdir(model):
        return None
    if not any(os.path.isfile(os.path.join(model, f)) for f in (SINGLE_FILE, INDEX_FILE)):
        raise ValueError(f"model {model} has no {SINGLE_FILE} or {INDEX_FILE}: no weights to "
                         f"load (pass --init-from-hf false to train from random initialisation)")
    base = load_model_config(model, strict=False)  # the run's strictness was applied already
    changed = _shape_changes(hf_tensor_shapes(base), hf_tensor_shapes(model_config))
    if changed:
        fields = _fields_changing_shapes(base, overrides) or sorted(overrides)
        raise ValueError(f"model_overrides {', '.join(fields)} change the shapes of the weights "
                         f"in {model} ({changed[0]}{' ...' if len(changed) > 1 else ''}); pass "
                         f"--init-from-hf false to train that model from random initialisation")
    with HFCheckpointReader(model, verify=False) as reader:  # headers only; data checked at load
        check_checkpoint_tensors(reader, hf_tensor_shapes(model_config))
    return model
