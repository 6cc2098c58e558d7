"""Launched by tests/test_torchrun.py under `torchrun --nproc_per_node N`: a RAFT run through raft.run, then each
rank saves the weights it holds in memory (rank<R>.pt in --out_dir) so the test can compare the ranks, and which
engine trained them (rank<R>.mode.pt: FSDP2-sharded or not, how many DistributedDataParallel wrappers were made)."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import raft  # noqa: E402

made = []


class CountingDDP(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, *args, **kwargs):
        made.append(1)
        super().__init__(*args, **kwargs)


torch.nn.parallel.DistributedDataParallel = CountingDDP  # raft.finetune looks it up at call time
torch.distributed.init_process_group("gloo")
cfg = raft.parse(sys.argv[1:])
rows, model = raft.run(cfg)
# full tensors on every rank: DDP's replicas as they are, FSDP2's shards gathered (a collective)
full = {
    k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()
}
torch.save(full, os.path.join(cfg.out_dir, f"rank{raft.RANK}.pt"))
torch.save(
    {"fsdp": bool(raft.fsdp_modules(model)), "ddp": len(made)}, os.path.join(cfg.out_dir, f"rank{raft.RANK}.mode.pt")
)
raft.dist.stop(True)  # the kit's own ending: barrier, destroy, then no interpreter shutdown
raft.dist.exit_worker()
