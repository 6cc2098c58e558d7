"""One raft.finetune step on a fixed global batch with plain SGD (AdamW's first step would hide a gradient's scale),
shared by tests/test_torchrun.py: run in one process, or under torchrun, where rank 0 saves the trained weights."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dist  # noqa: E402
import models  # noqa: E402
import raft  # noqa: E402
from models import build_example  # noqa: E402


def one_step(mode: str, model_dir: str, shard: bool) -> dict:
    cfg = raft.Config(model=model_dir, lr=0.5, epochs=1, train_batch_size=8, micro_batch_size=2, max_grad_norm=1e9,
                      lora_r=4 if mode == "lora" else 0, lora_dropout=0.0, device="cpu")  # fmt: skip
    model, _ = models.load_policy(cfg, torch.device("cpu"), shard=shard)
    g = torch.Generator().manual_seed(0)
    examples = []  # 7 rows for a batch of 8: the ranks get unequal shares
    for n in (5, 9, 3, 12, 7, 4, 8):
        x = torch.randint(4, 200, (n,), generator=g).tolist()
        examples.append(build_example(x[:2], x[2:], 1))
    real = torch.optim.AdamW
    torch.optim.AdamW = lambda params, lr, weight_decay, foreach=None: torch.optim.SGD(params, lr=lr)
    try:
        raft.finetune(model, examples, cfg, seed=0)
    finally:
        torch.optim.AdamW = real
    full = models.full_state_dict(model)  # FSDP2: gathered to rank 0 (a collective); None otherwise
    state = full if full is not None else model.state_dict()
    return {k: v.detach().cpu().clone() for k, v in state.items() if "lora_" in k or mode == "full"}


if __name__ == "__main__":
    torch.distributed.init_process_group("gloo")
    model_dir, out_dir, *modes = sys.argv[1:]  # one launch for every mode: a launch mostly imports
    for mode in modes:
        weights = one_step(mode, model_dir, shard=True)
        if int(os.environ["RANK"]) == 0:
            torch.save(weights, os.path.join(out_dir, f"{mode}.pt"))
    dist.stop(True)  # the kit's own ending: barrier, destroy, then no interpreter shutdown
    dist.exit_worker()
