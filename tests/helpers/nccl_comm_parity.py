"""The collectives and LayerCommunicator checks under NCCL on CUDA (float64), for 2+ GPUs.

    torchrun --nproc-per-node 2 -m tests.helpers.nccl_comm_parity

Runs the same checks as ``test_collectives.py`` and ``test_communicator.py`` (forward and backward
against the single-process reference, exact collective counts), on the NCCL code path
(single-tensor all-gather / reduce-scatter with padded variable sizes).
"""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from tests.integration import test_collectives as TC
from tests.integration import test_communicator as TM

BOTH = TM.BOTH
CASES_2 = (
    TM.Case("tp2 (k=1)", dict(world=2, attn_tp=2), (5,), True,
            BOTH + ((True, True, "all_to_all"), (False, True, "local", True))),
    TM.Case("tp1 cp2, moe_tp2 (k=2)", dict(world=2, attn_cp=2, moe_tp=2, moe_dp=1), (3, 3),
            True, BOTH),
    TM.Case("tp1 dp2, moe_ep2 (k=2), uneven", dict(world=2, attn_dp=2, moe_ep=2, moe_dp=1),
            (4, 1), True, BOTH),
    TM.Case("tp1 dp2, moe_ep2 (k=2), uneven, inference", dict(world=2, attn_dp=2, moe_ep=2,
                                                              moe_dp=1), (0, 3), False, BOTH),
)


def main() -> None:
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_default_device(f"cuda:{local}")
    start = time.time()
    TC._check_everything(rank, TC._groups(rank, world))
    checked = TM._run_cases(rank, world, CASES_2) if world == 2 else 0
    torch.cuda.synchronize()
    if rank == 0:
        print(f"NCCL parity OK on {world} GPUs: collectives + {checked} communicator configs "
              f"in {time.time() - start:.1f}s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
