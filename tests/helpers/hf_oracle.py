"""The ``transformers`` oracle for model tests: tiny random models saved as HF directories, and
their logits, loss and per-HF-tensor gradients.

Imported only by the parent test process (spawned ranks never import transformers: it is slow to
import and the ranks only need the saved directory and the reference tensors).
"""
from __future__ import annotations

import torch

from megatron_ext.models.config import ModelConfig


def hf_config_object(cfg: ModelConfig):
    from transformers import AutoConfig

    d = cfg.to_hf_dict()
    d.pop("architectures", None)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def build_hf_model(cfg: ModelConfig, path: str, *, seed: int = 0,
                   max_shard_size: str | int | None = None):
    """A ``transformers`` model of ``cfg`` with every weight random (norms around 1, router
    weights large enough that routing is decisive), saved to ``path`` in float32."""
    from transformers import AutoModelForCausalLM

    hf_cfg = hf_config_object(cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager",
                                             experts_implementation="eager",
                                             dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("mlp.gate.weight"):
                p.copy_(0.5 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.08 * noise)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(path, **kwargs)
    return model


def per_hf_tensor(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{in-memory parameter name: tensor}`` (e.g. gradients) -> ``{HF checkpoint key: tensor}``
    through transformers' own save-time conversion (fused experts -> per-expert keys)."""
    from transformers.modeling_utils import revert_weight_conversion

    converted = revert_weight_conversion(model, dict(tensors))
    return {k: v.detach().clone() for k, v in converted.items()}


def to_dtype(model, dtype: torch.dtype):
    """A copy of ``model`` in ``dtype`` whose RoPE tables are still computed in float32, as the
    model does in its native dtype (and as megatron_ext does): only the arithmetic precision of
    the network changes, so float64 comparisons are exact up to float64 rounding."""
    import copy

    ref = copy.deepcopy(model).to(dtype)
    for module in ref.modules():
        if hasattr(module, "inv_freq"):
            module.inv_freq = module.inv_freq.float()
            module.original_inv_freq = module.original_inv_freq.float()
    return ref


def hf_reference(model, sequences: list[torch.Tensor], labels: list[torch.Tensor], *,
                 dtype: torch.dtype = torch.float64) -> dict:
    """Run each sequence alone (no padding) through a ``dtype`` copy of ``model``.

    Returns ``logits`` (list, ``[s_i, V]``), ``loss`` = sum of token cross-entropies over every
    sequence / number of tokens, and ``grads`` of that loss keyed by HF checkpoint names."""
    ref = to_dtype(model, dtype)
    ref.zero_grad()
    total = sum(int(s.numel()) for s in sequences)
    logits_out, loss = [], torch.zeros((), dtype=dtype)
    for ids, lab in zip(sequences, labels):
        logits = ref(input_ids=ids.view(1, -1)).logits[0]
        loss = loss + torch.nn.functional.cross_entropy(logits, lab, reduction="sum") / total
        logits_out.append(logits.detach())
    loss.backward()
    grads = per_hf_tensor(ref, {n: p.grad if p.grad is not None else torch.zeros_like(p)
                                for n, p in ref.named_parameters()})
    return {"logits": logits_out, "loss": loss.detach(), "grads": grads}
