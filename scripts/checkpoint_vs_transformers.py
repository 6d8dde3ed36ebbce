"""A training checkpoint and its converted HF directory give the same logits: our model loaded
from the checkpoint (one process, float32, native layers) vs ``transformers`` on the directory
``examples/convert_checkpoint.py`` wrote. Used for the TE-trained run of issue 17 (a checkpoint
trained with ``--transformer-impl te`` must load natively and convert):

    torchrun --nproc-per-node 2 examples/pretrain.py --transformer-impl te --attn-cp 2 \\
        --moe-ep 2 --dtype bf16 --train-steps 20 --output-dir runs/te
    python examples/convert_checkpoint.py --checkpoint runs/te/checkpoints --output runs/te-hf \\
        --dtype float32
    python scripts/checkpoint_vs_transformers.py --checkpoint runs/te/checkpoints \\
        --hf runs/te-hf

Prints one JSON line (max |logit difference|, loss of both, whether the argmaxes agree) and
exits 1 when they differ beyond float32 noise. Needs ``transformers``.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="training checkpoint (step_N or parent)")
    p.add_argument("--hf", required=True, help="the HF directory converted from it")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--atol", type=float, default=2e-3)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    from megatron_ext.evaluation.model_source import open_model_source
    from megatron_ext.parallel.groups import ParallelGroups

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = open_model_source(args.checkpoint)
    ours = source.load(ParallelGroups.single_process(), dtype=torch.float32, device=device)
    hf = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).to(device).eval()
    vocab = source.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    pos = torch.arange(args.seq_len, device=device).expand_as(ids)
    with torch.no_grad():
        mine = ours(ids, position_ids=pos, gather_logits=True).logits[..., :vocab].double()
        theirs = hf(input_ids=ids).logits.double()
    loss = [float(torch.nn.functional.cross_entropy(x[:, :-1].reshape(-1, vocab),
                                                    ids[:, 1:].reshape(-1)))
            for x in (mine, theirs)]
    diff = float((mine - theirs).abs().max())
    same_argmax = bool((mine.argmax(-1) == theirs.argmax(-1)).all())
    print(json.dumps({"checkpoint": source.path, "step": source.step, "hf": args.hf,
                      "max_abs_logit_diff": diff, "loss_ours": loss[0],
                      "loss_transformers": loss[1], "argmax_equal": same_argmax}), flush=True)
    return 0 if diff <= args.atol and same_argmax else 1


if __name__ == "__main__":
    sys.exit(main())
