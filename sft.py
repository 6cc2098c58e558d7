"""Supervised fine-tuning, the paper's starting point (LLaMA-7B, 1 epoch on HH-RLHF's chosen responses), with the
same fine-tune step as a RAFT stage: prompt tokens carry no loss and EOS is trained, since a dataset response ends.

    python sft.py --model M --dataset Dahoas/full-hh-rlhf --sft_field chosen --epochs 1 --out_dir runs/sft
    torchrun --nproc_per_node 8 sft.py ...   # the same, FSDP2 (full) or DDP (LoRA) over 8 GPUs

Every (prompt, response) pair is kept, also when prompts repeat (HH-RLHF has several responses per prompt). The
model is written aside and renamed into --out_dir; start RAFT from it with `raft.py --model <out_dir>`.
"""

import dataclasses
import json
import os
import time
from dataclasses import dataclass

from transformers import HfArgumentParser

import dist
from data import encode_pair, save_model_dir, usable_prompts
from dist import DIST, MASTER, pick_device, print0
from models import build_example, full_state_dict, load_policy, load_tokenizer, release
from raft import Config, finetune, opt, validate


@dataclass
class SFTConfig(Config):
    sft_field: str = opt("chosen", "the field with the response to learn (paper: HH-RLHF's chosen)")


def sft(cfg: SFTConfig) -> float:
    """Fine-tune --model on the (prompt, --sft_field) pairs of --dataset and save it; returns the last epoch's loss."""
    if os.path.isdir(cfg.out_dir) and os.listdir(cfg.out_dir):
        raise SystemExit(f"--out_dir {cfg.out_dir} is not empty; choose a new dir for the SFT model")
    device = pick_device(cfg.device)
    tok, ctx = load_tokenizer(cfg.model, cfg)
    records = usable_prompts(cfg, tok, ctx, cfg.dataset_split, (cfg.sft_field,), unique=False, log=print0)[0]
    model, tok = load_policy(cfg, device, shard=DIST)
    examples = [build_example(*encode_pair(tok, r["prompt"], r[cfg.sft_field]), tok.eos_token_id) for r in records]
    fit = [e for e in examples if len(e[0]) <= ctx]
    if len(fit) < len(examples):
        print0(f"dropped {len(examples) - len(fit)} pairs longer than the model's context of {ctx} tokens")
    print0(f"SFT: {len(fit)} (prompt, {cfg.sft_field}) pairs, {cfg.epochs} epoch(s), lr {cfg.lr}, on {device}")
    t0 = time.time()
    loss = finetune(model, fit, cfg, seed=cfg.seed)
    state = full_state_dict(model)  # FSDP2: gathered to rank 0 (every rank takes part)
    if MASTER:
        info = {"sft_loss": loss, "n_examples": len(fit), "config": dataclasses.asdict(cfg)}
        save_model_dir(cfg.out_dir, model, tok, state, {"sft.json": json.dumps(info, indent=1)})
    release(model)
    print0(f"SFT: last-epoch loss {loss:.3f} ({time.time() - t0:.0f}s); model saved to {cfg.out_dir} "
           f"(start RAFT from it with --model {cfg.out_dir})")  # fmt: skip
    return loss


def main(argv=None):
    cfg = HfArgumentParser(SFTConfig).parse_args_into_dataclasses(args=argv)[0]
    if not cfg.model or not cfg.dataset:
        raise SystemExit("sft.py needs --model and --dataset")
    cfg.out_dir = cfg.out_dir or "runs/sft"
    validate(cfg, needs_reward=False)
    if cfg.regime != "raft" or cfg.loss != "sft":  # both need RAFT's kept samples (prompts, π_old), which SFT has not
        raise SystemExit("config error: sft.py trains the paper's way: --epochs over the pairs with --loss sft; drop "
                         "--regime and --loss")  # fmt: skip
    dist.quiet_libraries()
    own = dist.start(pick_device(cfg.device))
    loss = sft(cfg)
    dist.stop(own)
    return loss


if __name__ == "__main__":
    main()
    dist.exit_worker()
