"""Every check of the options that needs no model. A run that cannot mean anything (a value outside its meaning, NaN
or inf where a number is needed, a combination under which nothing can be learned) is refused in one line that names
the option and the fix, before any model loads. raft.py (and through it sft.py and demo.py) calls `validate`;
eval.py and diffusion.py call the parts they share. What each check refuses and why: docs/outputs.md, "Bad input".
Imports data, dist, losses, metrics, reward and sampling; raft.py imports it.
"""

import math
import os
import re

import torch

from data import FORMATS
from dist import LOCAL_RANK, WORLD
from losses import ADVANTAGES, AGGREGATIONS, LOSSES
from metrics import pass_ks
from reward import parse_weights
from sampling import check_backend

RANKINGS = ("local", "global", "random", "positive", "all")
BACKENDS = ("fast", "hf", "vllm")


def need(ok, msg: str):
    if not ok:
        raise SystemExit(f"config error: {msg}")


def finite(cfg, *names):
    """argparse takes "nan" and "inf" for a float; none of these options means anything there."""
    for name in names:
        need(math.isfinite(getattr(cfg, name)), f"--{name} {getattr(cfg, name)}: give a finite number")


def check_device(name: str):
    """--device: auto, cpu or cuda, and under cuda a GPU for this process (torchrun starts one per local rank)."""
    need(name in ("auto", "cpu", "cuda"), f"--device {name!r}: choose auto, cpu or cuda (each process takes the GPU "
         "of its local rank)")  # fmt: skip
    need(name != "cuda" or torch.cuda.is_available(), "--device cuda: torch sees no GPU (torch.cuda.is_available() "
         "is False: a CPU build of torch, or CUDA_VISIBLE_DEVICES empty); use --device cpu or auto")  # fmt: skip
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        n = torch.cuda.device_count()
        need(LOCAL_RANK < n, f"--device {name}: each process takes the GPU of its local rank, cuda:{LOCAL_RANK}, and "
             f"torch sees {n}; start at most {n} processes per node, each seeing all of the node's GPUs")  # fmt: skip


def check_sampling(cfg):
    """The sampling options raft.py and eval.py share."""
    finite(cfg, "temperature", "top_p")
    need(cfg.temperature >= 0, "--temperature must be ≥ 0 (0 = greedy)")
    need(0 < cfg.top_p <= 1, "--top_p must be in (0, 1]")
    need(cfg.top_k >= 0 and cfg.max_new_tokens >= 1 and cfg.gen_batch_size >= 1 and cfg.max_prompt_tokens >= 1,
         "--top_k ≥ 0; --max_new_tokens, --gen_batch_size, --max_prompt_tokens ≥ 1")  # fmt: skip
    need(cfg.gen_backend in BACKENDS, f"--gen_backend {cfg.gen_backend!r}: choose one of {BACKENDS}")
    need(all(cfg.stop), "--stop '': an empty stop string ends every response before its first token; drop it")
    check_device(cfg.device)


def check_rewards(cfg, needs_reward=True):
    """The reward options raft.py and eval.py share."""
    need(cfg.reward or not needs_reward, "--reward is required (file.py:function, module:function or a reward model)")
    parse_weights(cfg.reward_weights, len(cfg.reward))  # one finite weight per --reward, not all 0
    need(cfg.reward_batch_size >= 1, "--reward_batch_size must be ≥ 1")
    need(set(re.findall(r"{(\w*)}", cfg.reward_template)) <= {"prompt", "response"},
         "--reward_template may use only {prompt} and {response}")  # fmt: skip
    models = [s for s in cfg.reward if ":" not in s or os.path.isdir(s)]  # as reward.load_reward tells them apart
    need(not models or "{response}" in cfg.reward_template, f"--reward_template {cfg.reward_template!r} has no "
         f"{{response}}: the reward model {models[0] if models else ''} would score every response alike")  # fmt: skip


def validate(cfg, needs_reward=True):
    """Every check of a raft.py Config (sft.py's too) that needs no model, with the fix in the message."""
    need(cfg.K >= 1 and cfg.prompts_per_stage >= 1 and cfg.train_batch_size >= 1,
         "--K, --prompts_per_stage and --train_batch_size must be ≥ 1")  # fmt: skip
    need(cfg.prompts_per_stage % WORLD == 0, f"--prompts_per_stage {cfg.prompts_per_stage} is not divisible by the "
         f"{WORLD} processes; use a multiple of {WORLD}")  # fmt: skip
    need(cfg.train_batch_size % WORLD == 0, f"--train_batch_size {cfg.train_batch_size} is not divisible by the "
         f"{WORLD} processes; use a multiple of {WORLD}")  # fmt: skip
    need(min(cfg.micro_batch_size, cfg.mini_batches) >= 1, "--micro_batch_size and --mini_batches must be ≥ 1")
    need(cfg.loss != "raftpp", "--loss raftpp is now --loss clip --advantage correct (RAFT++: the clipped ratio)")
    choices = dict(ranking=RANKINGS, loss=LOSSES, prompt_format=FORMATS, finetune_from=("current", "base"),
                   report_to=("none", "tensorboard", "wandb"), regime=("raft", "rl"), advantage=ADVANTAGES,
                   loss_agg=AGGREGATIONS)  # fmt: skip
    for name, options in choices.items():
        need(getattr(cfg, name) in options, f"--{name} {getattr(cfg, name)!r}: choose one of {options}")
    check_sampling(cfg)
    check_backend(cfg)  # --gen_backend vllm: vLLM installed in the version needed; its LoRA rank and dtype
    finite(cfg, "keep_threshold", "lr", "weight_decay", "kl_beta", "clip_eps", "vllm_memory", "lora_dropout")
    # the optimizer: a rate and decay that are numbers, and a clipping norm that keeps the gradient's sign (0 zeroes
    # every step, a negative one turns it around; inf turns clipping off)
    need(cfg.lr > 0 and cfg.weight_decay >= 0, "--lr must be > 0 and --weight_decay ≥ 0")
    need(cfg.max_grad_norm > 0, f"--max_grad_norm {cfg.max_grad_norm}: must be > 0 (inf turns clipping off)")
    need(cfg.epochs >= 1 and cfg.stages >= 1 and cfg.keep_last >= 0, "--epochs, --stages ≥ 1; --keep_last ≥ 0")
    # held-out evaluation
    need(cfg.eval_prompts >= 0 and cfg.eval_samples >= 1, "--eval_prompts ≥ 0; --eval_samples ≥ 1")
    ks = pass_ks(cfg.pass_k)  # "1,8" -> [1, 8]; a malformed list is an error of its own
    need(max(ks, default=1) <= cfg.eval_samples, f"--pass_k {cfg.pass_k}: each k must be ≤ --eval_samples")
    need(cfg.eval_prompts > 0 or not (ks or cfg.eval_samples > 1), "--eval_prompts 0 turns the held-out evaluation "
         "off, so --pass_k and --eval_samples would measure nothing; give --eval_prompts > 0 or drop them")  # fmt: skip
    # what a kept sample weighs and how its ratio is clipped
    need(0 < cfg.clip_eps < 1, f"--clip_eps {cfg.clip_eps}: must be in (0, 1) (the ratio's lower bound is 1 − ε)")
    high = cfg.clip_eps_high
    need(high is None or (math.isfinite(high) and high > 0), f"--clip_eps_high {high}: must be a number > 0")
    need(high is None or cfg.loss == "clip", "--clip_eps_high bounds --loss clip's ratio; add --loss clip or drop it")
    need(not (cfg.advantage == "grpo" and cfg.K == 1), "--advantage grpo compares a prompt's samples: with --K 1 "
         "every advantage is 0; use --K ≥ 2")  # fmt: skip
    need(not (cfg.K == 1 and cfg.drop_all_correct and (cfg.drop_all_wrong or cfg.advantage in ("one", "correct"))),
         "with --K 1 every prompt is all-correct or all-wrong: --drop_all_correct keeps only wrong samples (with "
         "--drop_all_wrong, none), which --advantage one trains toward and correct weighs 0; use --K ≥ 2")  # fmt: skip
    need(cfg.kl_beta >= 0, "--kl_beta must be ≥ 0")
    need(not (cfg.kl_beta and cfg.ranking == "all"), "--kl_beta ranks by r − β·KL, and --ranking all keeps every "
         "sample whatever its score; measure the KL alone with --eval_kl")  # fmt: skip
    # the regimes
    need(cfg.regime == "raft" or cfg.finetune_from == "current", "--regime rl keeps its AdamW across stages; "
         "--finetune_from base restarts each stage: use --regime raft with it")  # fmt: skip
    need(cfg.regime == "raft" or cfg.prompts_per_stage % cfg.mini_batches == 0, f"--regime rl: --mini_batches "
         f"{cfg.mini_batches} must divide --prompts_per_stage {cfg.prompts_per_stage} (each optimizer step takes "
         f"the samples of b/N prompts)")  # fmt: skip
    # memory modes
    need(cfg.lora_r >= 0, "--lora_r must be ≥ 0 (0 is full fine-tuning)")
    need(0 <= cfg.lora_dropout < 1, f"--lora_dropout {cfg.lora_dropout}: must be in [0, 1)")
    need(not cfg.lora_r or cfg.lora_alpha > 0, f"--lora_alpha {cfg.lora_alpha}: must be > 0 (the adapters' update "
         "is scaled by alpha / r: 0 trains nothing)")  # fmt: skip
    need(all(t.strip() for t in cfg.lora_target_modules.split(",")), f"--lora_target_modules "
         f"{cfg.lora_target_modules!r}: an empty name; give names such as q_proj,v_proj, or all-linear")  # fmt: skip
    need(cfg.lora_r > 0 or not cfg.load_in_8bit, "--load_in_8bit trains adapters on a frozen 8-bit base; full "
         "fine-tuning of 8-bit weights is not possible: add --lora_r 16 (or drop --load_in_8bit)")  # fmt: skip
    need(cfg.lora_r > 0 or not cfg.merge_lora, "--merge_lora needs --lora_r > 0")
    need(cfg.load_in_8bit or not cfg.gen_dequantized, "--gen_dequantized dequantizes an 8-bit base for sampling: "
         "add --load_in_8bit (or drop --gen_dequantized)")  # fmt: skip
    need(not (cfg.reward_load_in_8bit and cfg.offload_reward), "--reward_load_in_8bit keeps the 8-bit reward model "
         "where it loads; drop --offload_reward (or load it in bf16)")  # fmt: skip
    need(0 < cfg.vllm_memory <= 1, f"--vllm_memory {cfg.vllm_memory}: a share of the GPU's memory, in (0, 1]")
    # model, data, reward
    need(cfg.model is not None, "--model is required (a hub id or a path); python demo.py runs the offline demo")
    need(cfg.dataset is not None, "--dataset is required (a .jsonl file or a dataset name)")
    need(not (cfg.eval_split and str(cfg.dataset).endswith(".jsonl")), "--eval_split: a .jsonl file is one split; "
         "use a directory of <split>.jsonl files or a hub dataset, or drop --eval_split")  # fmt: skip
    check_rewards(cfg, needs_reward)
    try:
        discard = re.compile(cfg.discard_regex or "")
    except re.error as e:
        raise SystemExit(f"config error: --discard_regex {cfg.discard_regex!r} does not compile ({e})")
    need(not cfg.discard_regex or not discard.search(""), f"--discard_regex {cfg.discard_regex!r} matches the empty "
         "string, so it matches every response and nothing is ever kept")  # fmt: skip
