"""RAFT: Reward rAnked FineTuning (Dong et al., TMLR 2023, arXiv 2304.06767) in one readable file.

Each stage t = 1..iterations:
  1. Sample    the next b = --prompts_per_iter prompts of the shuffled prompt set (without replacement; reshuffled
               when it runs out); K = --K responses each at temperature λ (top_k 0, top_p 1, ≤ 128 new tokens),
               by fastgen.py: each prompt prefilled once for its K samples, CUDA-graph decoding on a GPU.
  2. Rank      score every (prompt, response) with --reward; keep the best response per prompt (--ranking local),
               the top b of all b·K (global, the paper's appendix), or a random one (the control). Optionally rank
               by r − β·(log p_θ(y|x) − log p_0(y|x)) (--kl_beta, paper Table 7) and drop responses that match
               --discard_regex (the paper's "#" reward hack). Empty responses and NaN rewards are never kept.
  3. Fine-tune SFT of the current model on the kept set: loss on response tokens only, EOS trained only where
               the response ended by itself, samples packed into rows with a block-diagonal mask (no attention
               across samples, no padding waste), AdamW with linear decay sized from this stage's real step count;
               a fresh optimizer every stage.
Stage 0 evaluates the starting model; every stage after its fine-tuning is evaluated on held-out prompts.
The paper's starting point, SFT on HH-RLHF's chosen responses, is the same fine-tune step: --sft_only.

Also: LoRA (--lora_r), an 8-bit base under LoRA (--load_in_8bit, --gen_dequantized), mixed bf16 (--bf16), loaded
by models.py; torchrun (each rank samples and scores its share of the prompts, every rank ranks the whole gathered
batch and trains on its rows of it, through DDP for LoRA / 8-bit and FSDP2 for full fine-tuning); crash-safe stage
directories and --resume; the paper's ablation knobs (--kl_beta, --ranking, --generator_model, --finetune_from).

Departures from the authors' LMFlow code (see README): responses are cut by token position, not string replace;
prompt tokens carry no loss; EOS is trained; packing never lets samples attend to each other; the LR schedule uses
the real step count; many prompts sampled at once; the logged eval reward comes from held-out prompts.

    python raft.py                                   # offline demo: a tiny Llama learns positive reviews
    python raft.py --model M --reward R --dataset D  # your own run (see README)
    python raft.py --sft_only --sft_field chosen --model M --dataset Dahoas/full-hh-rlhf --epochs 1 --out_dir S
    torchrun --nproc_per_node 8 raft.py --model M --reward R --dataset D --lora_r 16 --bf16   # 8 GPUs, DDP
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, HfArgumentParser

import fastgen
from data import (
    FORMATS,
    check_run_dir,
    completed_stages,
    demo_prompts,
    demo_reviews,
    load_prompts,
    prune_models,
    save_model_dir,
    save_stage,
    stop_strings,
    train_demo_tokenizer,
    write_jsonl,
    write_metrics,
)
from eval import text_metrics
from models import (
    dequantized_copy,
    fsdp_modules,
    full_state_dict,
    full_weights,
    load_policy,
    load_tokenizer,
    save_merged,
)
from reward import load_rewards, parse_weights, score


@dataclass
class Config:
    # ---- model, data, reward
    model: Optional[str] = field(
        default=None,
        metadata={
            "help": "Hub id or path of the causal LM to align (the paper: LLaMA-7B after 1 epoch of SFT). None runs the offline demo."
        },
    )
    dataset: Optional[str] = field(
        default=None,
        metadata={
            "help": "A .jsonl/.json file with a prompt field, or an HF dataset name (the paper: Dahoas/full-hh-rlhf)."
        },
    )
    dataset_split: str = field(
        default="train", metadata={"help": "Split of an HF dataset (or key of a .json object) to read prompts from."}
    )
    prompt_field: str = field(
        default="prompt", metadata={"help": "Field that holds the prompt text (HH-RLHF: prompt)."}
    )
    prompt_format: str = field(
        default="auto",
        metadata={
            "help": "hh: HH-RLHF turns as the paper's '###Human: …###Assistant:' text; raw: the prompt as it is; auto: hh for rows with HH-RLHF's chosen/rejected fields, else raw."
        },
    )
    chat_template: bool = field(
        default=False,
        metadata={
            "help": "Render prompts with the model's chat template (apply_chat_template), for chat models; rewards still see the ###Human text their models were trained on."
        },
    )
    eval_split: Optional[str] = field(
        default=None,
        metadata={
            "help": "Take the held-out prompts from this split (paper: test) instead of out of the training prompts."
        },
    )
    eval_prompts: int = field(
        default=4608,
        metadata={
            "help": "Held-out prompts scored every stage (paper: 4,608 test prompts); from --eval_split, else taken out of the training prompts."
        },
    )
    max_prompt_tokens: int = field(
        default=256,
        metadata={
            "help": "Drop prompts longer than this many tokens (paper: 256, which keeps 82,147 HH-RLHF prompts)."
        },
    )
    reward: list[str] = field(
        default_factory=list,
        metadata={
            "action": "extend",
            "help": "file.py:function or module:function f(prompts, responses) -> list[float] (a file is executed as Python), or hub id/path of a sequence-classification reward model; repeat it to add several rewards.",
        },
    )
    reward_weights: str = field(
        default="",
        metadata={
            "help": "Comma-separated weights w_i of several --reward, e.g. 1,0.5: the reward is Σ w_i r_i (default: all 1)."
        },
    )
    reward_template: str = field(
        default="{prompt} {response}",
        metadata={
            "help": "Text a reward model scores; {response} is stripped, so the default gives the paper's reward-model text '###Human: q###Assistant: a'."
        },
    )
    reward_batch_size: int = field(
        default=32, metadata={"help": "Texts per reward-model forward pass (length-sorted batches)."}
    )
    reward_load_in_8bit: bool = field(
        default=False,
        metadata={
            "help": "Load reward models in 8-bit (bitsandbytes): about half the memory of bf16, slower; not with --offload_reward."
        },
    )
    offload_reward: bool = field(
        default=False,
        metadata={
            "help": "Keep reward models on the CPU between scorings, on the GPU only while scoring: RAFT needs one model at a time."
        },
    )
    # ---- step 1: sample
    prompts_per_iter: int = field(default=2048, metadata={"help": "b, global prompts per stage (paper: 2048)."})
    K: int = field(default=8, metadata={"help": "Responses per prompt (paper: 8/16/32; 32 in the main table)."})
    temperature: float = field(
        default=1.0,
        metadata={"help": "λ, sampling temperature (paper: 1.0, the most diverse of 0.7/0.85/1.0); 0 = greedy."},
    )
    top_k: int = field(default=0, metadata={"help": "Top-k filter while sampling (paper: 0 = off)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus filter while sampling (paper: 1.0 = off)."})
    max_new_tokens: int = field(
        default=128,
        metadata={"help": "Longest response in tokens (paper: 128); responses cut here get no EOS in training."},
    )
    stop: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Strings that end a response (trimmed off). Default: none, or with --prompt_format hh the next human turn, ###Human and Human: (as the paper)."
        },
    )
    gen_batch_size: int = field(
        default=64,
        metadata={
            "help": "Prompts sampled together (B·K rows per decoding step); length-sorted. LMFlow made one call per prompt. Lower it if memory runs out."
        },
    )
    gen_backend: str = field(
        default="fast",
        metadata={
            "help": "fast: fastgen.py (each prompt prefilled once and shared by its K samples, CUDA-graph decode steps; falls back to hf for attention it cannot run); hf: model.generate (stops at --stop strings early)."
        },
    )
    cuda_graphs: bool = field(
        default=True,
        metadata={
            "help": "With --gen_backend fast on a GPU: replay each decoding step as a CUDA graph (not for 8-bit or FSDP-sharded models, which run eager)."
        },
    )
    # ---- step 2: rank
    ranking: str = field(
        default="local",
        metadata={
            "help": "local: best per prompt (paper); global: top b of all b·K (paper appendix); random: one random response per prompt (control)."
        },
    )
    kl_beta: float = field(
        default=0.0,
        metadata={
            "help": "β in r − β·(log p_θ − log p_0) with p_0 the stage-0 model (paper Table 7: 0 best for reward); > 0 keeps a copy of p_0."
        },
    )
    discard_regex: Optional[str] = field(
        default=None,
        metadata={"help": "Responses matching this regex are never kept (paper: '#' against a #-loving reward model)."},
    )
    eval_kl: bool = field(
        default=False,
        metadata={
            "help": "Report the KL to the stage-0 model (kl_to_start, eval_kl_to_start) even when --kl_beta is 0; keeps p_0 like --kl_beta does."
        },
    )
    generator_model: Optional[str] = field(
        default=None,
        metadata={
            "help": "Another causal LM (any tokenizer) that generates the K samples while --model trains on the kept ones (paper Table 8: a stronger generator); None: the policy generates."
        },
    )
    finetune_from: str = field(
        default="current",
        metadata={
            "help": "current: each stage fine-tunes the current model (paper); base: each stage restarts from the stage-0 weights, trained on the current model's kept samples (ReST-EM)."
        },
    )
    # ---- step 3: fine-tune
    lr: float = field(
        default=2e-5,
        metadata={
            "help": "AdamW peak learning rate, decayed linearly to 0 within each stage (paper: 2e-5). The optimizer is reset every stage."
        },
    )
    epochs: int = field(default=2, metadata={"help": "SFT epochs over each stage's kept set (paper: 2)."})
    train_batch_size: int = field(
        default=32,
        metadata={"help": "Global SFT batch in samples (not stated in the paper); reached by gradient accumulation."},
    )
    micro_batch_size: int = field(
        default=8, metadata={"help": "Samples per forward pass on one process; lower it if memory runs out."}
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Gradient clipping norm (a common SFT default; not stated in the paper)."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (0, as in LMFlow's SFT)."})
    # ---- memory: small GPUs (LoRA, 8-bit) and full precision
    bf16: bool = field(
        default=False,
        metadata={
            "help": "Compute in bf16 (autocast). Full fine-tuning keeps fp32 master weights and fp32 AdamW states: pure-bf16 AdamW rounds away most updates at lr 2e-5. With LoRA the frozen base is stored in bf16."
        },
    )
    lora_r: int = field(
        default=0,
        metadata={
            "help": "LoRA rank (0 = full fine-tuning). Only the adapters train and are saved each stage (the paper's diffusion runs used LoRA; its LLM runs were full)."
        },
    )
    lora_alpha: int = field(
        default=32, metadata={"help": "LoRA scaling alpha (peft; 2× a rank of 16 is a common choice)."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path (a common peft default)."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={
            "help": "Comma-separated module names for adapters, or all-linear (every attention and MLP projection, not the LM head)."
        },
    )
    load_in_8bit: bool = field(
        default=False,
        metadata={
            "help": "Load the policy's frozen base in 8-bit (bitsandbytes LLM.int8); needs --lora_r > 0. Fits a 7B run in ≈24 GB; 8-bit generation is slow."
        },
    )
    gen_dequantized: bool = field(
        default=False,
        metadata={
            "help": "With --load_in_8bit: sample from a temporary copy of the policy, int8 weights dequantized and the current adapters merged (bf16 on a GPU), freed after sampling. int8 generation is slow (reported ≈5× slower than bf16); this costs ≈2 bytes per parameter more while sampling (≈13.5 GB for 7B). Same weights up to LLM.int8's outlier handling."
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass: less memory, ≈30% more SFT time."}
    )
    merge_lora: bool = field(
        default=False,
        metadata={
            "help": "At the end, also save the base with the last adapters merged in to out_dir/merged (loadable without peft)."
        },
    )
    # ---- loop and output
    iterations: int = field(
        default=10, metadata={"help": "Number of RAFT stages (paper: ≈10–18, until the reward stops rising)."}
    )
    seed: int = field(
        default=42,
        metadata={"help": "Seeds prompt order, sampling, selection and SFT order; a CPU run repeats exactly."},
    )
    out_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "Run directory: config.json, metrics.jsonl, iter_XXXX/ (model, selected.jsonl), reward_curve.png. Default runs/raft (runs/demo for the demo)."
        },
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue from the last completed stage in --out_dir (a stage cut off midway is redone)."},
    )
    resume_force: bool = field(
        default=False,
        metadata={
            "help": "With --resume: accept a config that differs from the saved one (the differences are printed)."
        },
    )
    keep_last: int = field(
        default=0,
        metadata={
            "help": "Keep the model files of only the last N stages (0 = all); older ones are deleted after the new one is complete."
        },
    )
    report_to: str = field(
        default="none", metadata={"help": "none, tensorboard or wandb (those packages are optional)."}
    )
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu or cuda."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model repos to run their own Python code (off: safer)."}
    )
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "Check the options and print the resolved configuration as JSON, then exit without loading anything (run_a40.sh DRY_RUN=1)."
        },
    )
    demo_dir: str = field(
        default="runs/demo_model",
        metadata={
            "help": "Demo only: where the tiny pretrained review model and its prompts are built once and reused."
        },
    )
    # ---- the SFT starting point
    sft_only: bool = field(
        default=False,
        metadata={
            "help": "Only SFT --model on (prompt, --sft_field) pairs for --epochs with the stage fine-tune code and save it to --out_dir: the paper's start (LLaMA-7B, 1 epoch on chosen)."
        },
    )
    sft_field: str = field(
        default="chosen",
        metadata={"help": "With --sft_only: the field of the response to learn (paper: HH-RLHF chosen)."},
    )


# The demo: values for fields left at their paper defaults when no --model is given (a 2-core CPU, ≈1-2 min).
DEMO = dict(
    prompts_per_iter=64,
    K=8,
    max_new_tokens=32,
    eval_prompts=128,
    lr=1e-4,
    train_batch_size=16,
    micro_batch_size=16,
    iterations=6,
    out_dir="runs/demo",
)
RANKINGS = ("local", "global", "random")


# ---- distributed preamble: torchrun sets these; a plain `python raft.py` is rank 0 of 1 --------------------
RANK = int(os.environ.get("RANK", 0))
WORLD = int(os.environ.get("WORLD_SIZE", 1))
MASTER = RANK == 0  # only rank 0 prints, shows progress bars and writes files
# launched by torchrun (even with one process): DDP / FSDP2 over a process group, the same code path as 8 GPUs
DIST = WORLD > 1 or "TORCHELASTIC_RUN_ID" in os.environ


def print0(*args):
    if MASTER:
        print(*args, flush=True)


def bar(iterable, desc, total=None):
    """A progress bar on rank 0 when it writes to a terminal (None: tqdm's own check), none in logs or elsewhere."""
    return tqdm(iterable, desc=desc, total=total, disable=None if MASTER else True, leave=False, dynamic_ncols=True)


def shard(items: list) -> list:
    """This rank's contiguous share of a global list."""
    n = len(items)
    return items[RANK * n // WORLD : (RANK + 1) * n // WORLD]


def gather(items: list) -> list:
    """The concatenation of every rank's list, in rank order, on every rank (identity on one process)."""
    if WORLD == 1:
        return items
    parts = [None] * WORLD
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def barrier():
    if WORLD > 1:
        torch.distributed.barrier()


def crash_point(phase: str, stage: int):
    """Test hook: RAFT_CRASH_AT=phase@stage (every rank) or phase@stage:rank kills this process with SIGKILL here
    (tests/test_resume.py, tests/test_torchrun.py)."""
    if os.environ.get("RAFT_CRASH_AT") in (f"{phase}@{stage}", f"{phase}@{stage}:{RANK}"):
        os.kill(os.getpid(), signal.SIGKILL)


def pick_device(cfg: Config) -> torch.device:
    """cuda:LOCAL_RANK under torchrun on GPUs, else cuda or cpu as asked."""
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")


def validate(cfg: Config):
    """Every check that needs no model, with the fix in the message."""

    def need(ok, msg):
        if not ok:
            raise SystemExit(f"config error: {msg}")

    need(cfg.K >= 1, f"--K {cfg.K}: need at least 1 response per prompt")
    need(cfg.prompts_per_iter >= 1, "--prompts_per_iter must be ≥ 1")
    need(
        cfg.prompts_per_iter % WORLD == 0,
        f"--prompts_per_iter {cfg.prompts_per_iter} is not divisible by the "
        f"{WORLD} processes; use a multiple of {WORLD}",
    )
    need(
        cfg.train_batch_size % (cfg.micro_batch_size * WORLD) == 0,
        f"--train_batch_size {cfg.train_batch_size} "
        f"must be a multiple of --micro_batch_size × processes = {cfg.micro_batch_size * WORLD}",
    )
    need(cfg.gen_backend in ("fast", "hf"), f"--gen_backend {cfg.gen_backend!r}: fast or hf")
    need(cfg.gen_batch_size >= 1, "--gen_batch_size must be ≥ 1")
    need(cfg.ranking in RANKINGS, f"--ranking {cfg.ranking!r}: choose one of {RANKINGS}")
    need(cfg.temperature >= 0, "--temperature must be ≥ 0 (0 = greedy)")
    need(0 < cfg.top_p <= 1, "--top_p must be in (0, 1]")
    need(
        cfg.top_k >= 0 and cfg.max_new_tokens >= 1 and cfg.eval_prompts >= 0,
        "--top_k, --eval_prompts ≥ 0 and --max_new_tokens ≥ 1",
    )
    need(cfg.kl_beta >= 0, "--kl_beta must be ≥ 0")
    need(cfg.finetune_from in ("current", "base"), f"--finetune_from {cfg.finetune_from!r}: current or base")
    need(
        cfg.lora_r > 0 or not cfg.load_in_8bit,
        "--load_in_8bit trains adapters on a frozen 8-bit base; full "
        "fine-tuning of 8-bit weights is not possible: add --lora_r 16 (or drop --load_in_8bit)",
    )
    need(cfg.lora_r > 0 or not cfg.merge_lora, "--merge_lora needs --lora_r > 0")
    need(
        cfg.load_in_8bit or not cfg.gen_dequantized,
        "--gen_dequantized dequantizes an 8-bit base for sampling: add --load_in_8bit (or drop --gen_dequantized)",
    )
    need(
        not (cfg.reward_load_in_8bit and cfg.offload_reward),
        "--reward_load_in_8bit keeps the 8-bit reward model where it loads; drop --offload_reward (or load it in bf16)",
    )
    need(cfg.keep_last >= 0, "--keep_last must be ≥ 0 (0 keeps every stage's model)")
    need(cfg.lr > 0 and cfg.epochs >= 1 and cfg.iterations >= 1, "--lr > 0, --epochs ≥ 1, --iterations ≥ 1")
    need(cfg.report_to in ("none", "tensorboard", "wandb"), "--report_to: none, tensorboard or wandb")
    need(cfg.prompt_format in FORMATS, f"--prompt_format {cfg.prompt_format!r}: choose one of {FORMATS}")
    need(not cfg.sft_only or (cfg.model and not cfg.resume), "--sft_only needs --model and --dataset, and no --resume")
    need(
        cfg.reward or cfg.sft_only,
        "--reward is required with --model (file.py:function, module:function or a reward model)",
    )
    need(cfg.dataset is not None, "--dataset is required with --model (a .jsonl file or an HF dataset name)")
    need(
        not (cfg.eval_split and str(cfg.dataset).endswith(".jsonl")),
        "--eval_split: a .jsonl file is one split; "
        "use a directory of <split>.jsonl files or an HF dataset, or drop --eval_split",
    )
    parse_weights(cfg.reward_weights, len(cfg.reward))
    if cfg.discard_regex:
        try:
            re.compile(cfg.discard_regex)
        except re.error as e:
            raise SystemExit(f"config error: --discard_regex {cfg.discard_regex!r} does not compile ({e})")
    try:
        fields = set(re.findall(r"{(\w*)}", cfg.reward_template))
    except TypeError:
        fields = set()
    need(fields <= {"prompt", "response"}, "--reward_template may use only {prompt} and {response}")


# ---- small helpers shared by the steps -------------------------------------------------------------------
def amp(model, bf16: bool):
    """bf16 autocast for --bf16 (weights may stay fp32: mixed precision), a no-op otherwise."""
    return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=bf16)


def _pad(tok):
    """The padding id: the tokenizer's, else EOS (many causal LMs have no pad token)."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


# ---- step 1: sample ----------------------------------------------------------------------------------------
@functools.cache
def _bos_prefix(tok) -> tuple:
    """(BOS,) when the tokenizer puts BOS in front of a text, else (): asked once per tokenizer, not per prompt."""
    lead = tok("", add_special_tokens=True)["input_ids"]
    return (tok.bos_token_id,) if tok.bos_token_id is not None and lead[:1] == [tok.bos_token_id] else ()


def encode_prompt(tok, text: str) -> list[int]:
    """Prompt token ids with the tokenizer's leading special tokens (BOS) but never a trailing EOS (T5/ByT5 add one)."""
    return list(_bos_prefix(tok)) + tok(text, add_special_tokens=False)["input_ids"]


def encode_pair(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a text pair from a dataset (SFT on chosen, perplexity). Encoded as one text, so
    the response gets the tokens a model would generate after this prompt (SentencePiece adds a word-start piece to
    a text encoded on its own); if a token merged across the boundary, the response is encoded on its own."""
    p, both = encode_prompt(tok, prompt), encode_prompt(tok, prompt + response)
    return (p, both[len(p) :]) if both[: len(p)] == p else (p, tok(response, add_special_tokens=False)["input_ids"])


def cut_response(ids: list[int], tok, eos_ids: set, stop: list[str]) -> dict:
    """The response in the new tokens `ids`: up to the first EOS, or up to (not including) the first stop string.
    end_id is the token to train as the end (the EOS generated, or tok.eos for a stop string), None when the
    response ran into max_new_tokens and so did not end by itself."""
    end_id = None
    for n, t in enumerate(ids):
        if t in eos_ids:
            ids, end_id = ids[:n], t
            break
    text = tok.decode(ids, skip_special_tokens=True)
    cuts = [p for p in (text.find(s) for s in stop) if p >= 0]
    if cuts:  # keep the longest token prefix whose text stays before the stop string (binary search over decodes)
        p, lo, hi = min(cuts), 0, len(ids)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if len(tok.decode(ids[:mid], skip_special_tokens=True)) <= p else (lo, mid - 1)
        ids, end_id = ids[:lo], tok.eos_token_id
        text = tok.decode(ids, skip_special_tokens=True)
    return {"ids": ids, "text": text, "end_id": end_id}


@torch.no_grad()
def generate(model, tok, prompts: list[str], K: int, cfg: Config, desc="sample") -> list[list[dict]]:
    """K responses for each prompt -> [len(prompts)][K] dicts of cut_response. --gen_backend fast: fastgen.sample
    (each prompt prefilled once for its K samples, CUDA-graph decode); hf: model.generate, K copies of each prompt
    per row, left-padded. Either way many prompts per call (--gen_batch_size), shortest first."""
    model.eval()
    enc = [encode_prompt(tok, p) for p in prompts]
    eos_ids = {tok.eos_token_id} | set(_as_list(model.generation_config.eos_token_id))
    eos_ids.discard(None)
    new, policy = None, model
    if cfg.gen_dequantized and getattr(model, "is_loaded_in_8bit", False):
        model = dequantized_copy(model)  # freed when this function returns
    with full_weights(model):  # an FSDP2 policy is gathered once for the whole phase
        if cfg.gen_backend == "fast" and not getattr(policy, "_fastgen_refused", False):
            try:
                new = fastgen.sample(
                    model,
                    enc,
                    K,
                    max_new_tokens=cfg.max_new_tokens,
                    eos_ids=eos_ids,
                    pad_id=_pad(tok),
                    temperature=cfg.temperature,
                    top_k=cfg.top_k,
                    top_p=cfg.top_p,
                    batch_prompts=cfg.gen_batch_size,
                    cuda_graphs=cfg.cuda_graphs,
                    autocast_dtype=torch.bfloat16 if cfg.bf16 else None,
                    progress=lambda it: bar(it, desc),
                )
            except fastgen.Unsupported as e:  # decided at the first prefill, before any sample is drawn
                print0(f"--gen_backend fast: {e}; generating with model.generate instead")
                policy._fastgen_refused = True  # asked once per policy (not per dequantized copy), not every phase
        if new is None:
            new = _hf_generate(model, tok, enc, K, cfg, eos_ids, desc)
    return [[cut_response(ids, tok, eos_ids, cfg.stop) for ids in row] for row in new]


def _hf_generate(model, tok, enc: list[list[int]], K: int, cfg: Config, eos_ids: set, desc: str) -> list:
    """--gen_backend hf: model.generate on --gen_batch_size prompts × K rows per call -> [prompt][K] new token ids."""
    pad = _pad(tok)
    gc = GenerationConfig(
        do_sample=cfg.temperature > 0,
        temperature=cfg.temperature or None,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        pad_token_id=pad,
        eos_token_id=sorted(eos_ids),
        stop_strings=cfg.stop or None,
    )
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    out = [None] * len(enc)
    device = next(model.parameters()).device
    for s in bar(range(0, len(order), cfg.gen_batch_size), desc):
        idx = order[s : s + cfg.gen_batch_size]
        L = max(len(enc[i]) for i in idx)
        input_ids, valid = fastgen.left_pad([enc[i] for i in idx], L, pad)
        mask = valid.long()
        # K copies of each row (HF's num_return_sequences refuses K > 1 when greedy): [len(idx)·K, L + new]
        with amp(model, cfg.bf16):
            seqs = model.generate(
                input_ids=input_ids.repeat_interleave(K, 0).to(device),
                generation_config=gc,
                attention_mask=mask.repeat_interleave(K, 0).to(device),
                tokenizer=tok if cfg.stop else None,
            )
        new = seqs[:, L:].tolist()
        for r, i in enumerate(idx):
            out[i] = new[r * K : (r + 1) * K]
    return out


def _as_list(x):
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


# ---- log-probabilities of (prompt, response) rows: the KL term of step 2, the loss of step 3 ---------------
def build_example(prompt_ids: list[int], response_ids: list[int], end_id: Optional[int]):
    """(input_ids, labels) of one SFT row: prompt tokens carry no loss (-100); the end token only if it ended."""
    tail = response_ids + ([end_id] if end_id is not None else [])
    return prompt_ids + tail, [-100] * len(prompt_ids) + tail


def example(tok, prompt: str, sample: dict):
    return build_example(encode_prompt(tok, prompt), sample["ids"], sample["end_id"])


def pack(examples) -> tuple[list[list[int]], int]:
    """Rows of example indices, first-fit decreasing into rows as long as the longest example: never more rows or
    tokens than right padding would use, and short examples fill the gaps that padding would waste."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    C = len(examples[order[0]][0])
    rows, room = [], []
    for i in order:
        n = len(examples[i][0])
        r = next((r for r in range(len(rows)) if room[r] >= n), None)
        if r is None:
            rows.append([]), room.append(C)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= n
    return rows, C


def example_logprobs(model, examples, bf16=False):
    """Sum of log p(label) over each example's labelled positions, and their count: ([B], [B]).
    The examples are packed (`pack`) into rows [R, C] with positions restarting at 0 for each example and for the
    padding at a row's end, which transformers turns into a block-diagonal causal mask: nothing attends across
    examples. The LM head runs only where a label is (prompt tokens need no logits: a large saving with 128K-token
    vocabularies): a pre-hook hands it just those hidden states, [1, n, hidden]."""
    rows, C = pack(examples)
    ids = torch.zeros((len(rows), C), dtype=torch.long)  # padding: its own segment, after every real token
    pos = torch.arange(C).repeat(len(rows), 1)
    tgt = torch.full((len(rows), C), -100, dtype=torch.long)
    seg = torch.zeros((len(rows), C), dtype=torch.long)
    for r, row in enumerate(rows):
        off = 0
        for i in row:
            x, y = examples[i]
            n = len(x)
            ids[r, off : off + n], seg[r, off : off + n] = torch.tensor(x), i
            pos[r, off : off + n] = torch.arange(n)
            tgt[r, off : off + n - 1] = torch.tensor(y[1:], dtype=torch.long)  # position j predicts token j + 1
            off += n
        pos[r, off:] = torch.arange(C - off)
    keep = (tgt.flatten() != -100).nonzero().flatten()  # [n]: the positions that carry a loss
    device = next(model.parameters()).device
    keep_d = keep.to(device)
    head = getattr(model, "module", model).get_output_embeddings()  # under DDP: the wrapped model's
    hook = head.register_forward_pre_hook(lambda m, args: (args[0].flatten(0, 1)[keep_d][None],))
    try:
        with amp(model, bf16):
            logits = model(input_ids=ids.to(device), position_ids=pos.to(device), use_cache=False).logits[0].float()
    finally:
        hook.remove()
    lp = -torch.nn.functional.cross_entropy(logits, tgt.flatten()[keep].to(device), reduction="none")  # [n]
    seg = seg.flatten()[keep].to(device)
    total = torch.zeros(len(examples), device=device, dtype=lp.dtype).index_add(0, seg, lp)
    return total, torch.bincount(seg, minlength=len(examples))


@torch.no_grad()
def sequence_logprobs(model, examples, batch_size: int, bf16=False) -> list[float]:
    """log p(response (+end) | prompt) per example, for the KL term of the ranking score."""
    model.eval()
    out = []
    with full_weights(model):  # ranks score different numbers of batches: no collectives inside
        for s in range(0, len(examples), batch_size):
            out += example_logprobs(model, examples[s : s + batch_size], bf16)[0].tolist()
    return out


# ---- step 2: rank ------------------------------------------------------------------------------------------
def score_samples(tok, prompts, samples, reward_fn, kl=None) -> dict:
    """Add "reward" (NaN for NaN/inf) and, with a KL reference, "log_ratio" = log p_θ(y|x) − log p_0(y|x) to every
    sample dict of samples[len(prompts)][K], in place; one reward call for all of them. Returns the reward's stats
    (per-reward means, truncations; reward.load_rewards) over all ranks."""
    flat_p = [p for p, row in zip(prompts, samples) for _ in row]
    flat_s = [s for row in samples for s in row]
    for s, r in zip(flat_s, score(reward_fn, flat_p, [s["text"] for s in flat_s])):
        s["reward"] = r
    if kl and flat_s:
        for s, a, b in zip(flat_s, *kl([example(tok, p, s) for p, s in zip(flat_p, flat_s)])):
            s["log_ratio"] = a - b
    parts = gather([dict(getattr(reward_fn, "stats", {}))])  # means are averaged over ranks, counts summed
    return {k: sum(p[k] for p in parts) / (len(parts) if k.endswith("_mean") else 1) for k in parts[0]}


def select(scores: torch.Tensor, valid: torch.Tensor, mode: str, gen: torch.Generator) -> list[tuple[int, int]]:
    """Which samples to keep. scores, valid: [b, K]. Returns sorted (prompt, sample) pairs.
    local: the argmax per prompt over valid samples; global: the top b valid samples of all b·K;
    random: one uniformly random valid sample per prompt. Prompts without a valid sample are skipped."""
    b, K = scores.shape
    has = valid.any(1)
    if mode == "global":
        flat = scores.masked_fill(~valid, -math.inf).flatten()
        order = torch.sort(flat, descending=True, stable=True).indices[: min(b, int(valid.sum()))]
        return sorted((int(i) // K, int(i) % K) for i in order)
    rows = has.nonzero().flatten()
    if mode == "local":
        picks = scores.masked_fill(~valid, -math.inf).argmax(1)[rows]
    else:
        picks = torch.multinomial(valid[rows].float(), 1, generator=gen).flatten()
    return [(int(i), int(j)) for i, j in zip(rows, picks)]


def rank(prompts, samples, cfg: Config, gen):
    """Select from the scored samples[b][K] of the whole batch. Returns (rows for selected.jsonl, kept (prompt,
    sample) pairs, metrics). Empty responses, --discard_regex matches and NaN rewards are never kept."""
    b, K = len(prompts), cfg.K
    flat = [s for row in samples for s in row]
    rewards = torch.tensor([s["reward"] for s in flat]).view(b, K)
    empty = torch.tensor([not s["ids"] for s in flat]).view(b, K)
    discard = torch.tensor([bool(cfg.discard_regex and re.search(cfg.discard_regex, s["text"])) for s in flat]).view(
        b, K
    )
    valid = ~rewards.isnan() & ~empty & ~discard
    scores, m = rewards, {}
    if "log_ratio" in flat[0]:  # r − β·(log p_θ(y|x) − log p_0(y|x)), the sequence-level KL penalty of paper Table 7
        log_ratio = torch.tensor([s["log_ratio"] for s in flat]).view(b, K)
        scores = rewards - cfg.kl_beta * log_ratio
        m["kl_to_start"] = log_ratio.mean().item()
    keep = select(scores.masked_fill(~valid, 0.0), valid, cfg.ranking, gen)
    rows = [
        {
            "prompt": prompts[i],
            "response": samples[i][j]["text"],
            "reward": rewards[i, j].item(),
            "rewards": rewards[i].tolist(),
            "ended": samples[i][j]["end_id"] is not None,
        }
        for i, j in keep
    ]
    kept = torch.tensor([r["reward"] for r in rows]) if rows else torch.tensor([math.nan])
    m.update(
        {
            "reward_mean": rewards.nanmean().item(),
            "selected_reward_mean": kept.mean().item(),
            "n_selected": len(keep),
            "prompts_skipped": int((~valid.any(1)).sum()),
            "samples_nan_reward": int(rewards.isnan().sum()),
            "samples_empty": int(empty.sum()),
            "samples_discarded": int(discard.sum()),
            "samples_truncated": sum(s["end_id"] is None for s in flat),
        }
    )
    return rows, [(prompts[i], samples[i][j]) for i, j in keep], m


# the stage-0 model: p_0 of the KL term, and the weights --finetune_from base restarts from
def make_kl(cfg: Config, model, device):
    """With --kl_beta > 0 or --eval_kl: f(examples) -> (log p_θ, log p_0) per example, p_0 the stage-0 model. Under
    LoRA p_0 is the base with adapters switched off (no second copy); otherwise a frozen copy of --model. Else None."""
    if cfg.kl_beta == 0 and not cfg.eval_kl:
        return None
    lp = lambda m, ex: sequence_logprobs(m, ex, cfg.micro_batch_size, cfg.bf16)
    if cfg.lora_r:

        def with_base(ex):
            with model.disable_adapter():
                return lp(model, ex)

        return lambda ex: (lp(model, ex), with_base(ex))
    ref = load_policy(dataclasses.replace(cfg, gradient_checkpointing=False), device, frozen=True)[0]
    ref.requires_grad_(False)
    return lambda ex: (lp(model, ex), lp(ref, ex))


def trainable_state(model) -> dict:
    """A CPU copy of what trains (all weights, or the LoRA adapters): --finetune_from base restores it."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


# ---- step 3: fine-tune -------------------------------------------------------------------------------------
def finetune(model, examples, cfg: Config, seed: int, stage: int = 0) -> float:
    """SFT on `examples` (list of (input_ids, labels)); returns the mean token loss of the last epoch.
    Every rank holds the same examples and order and trains on every WORLD-th row of each global batch; DDP (LoRA,
    8-bit) or FSDP2 (full fine-tuning) averages the gradients. A fresh AdamW every call: each stage is a new SFT
    problem with its own schedule (LMFlow carried the optimizer state over)."""
    model.train()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    fsdp = bool(fsdp_modules(model))  # FSDP2 (full fine-tuning) or DDP (LoRA / 8-bit)
    net = torch.nn.parallel.DistributedDataParallel(model) if DIST and not fsdp else model
    total = cfg.epochs * math.ceil(len(examples) / cfg.train_batch_size)  # the real number of optimizer steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / total)  # linear decay to 0
    gen = torch.Generator().manual_seed(seed)
    pbar = bar(range(total), "train")
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(examples), generator=gen).tolist()
        loss_sum = torch.zeros(2, device=device)  # this rank's summed token loss and token count, this epoch
        for s in range(0, len(perm), cfg.train_batch_size):
            batch = sorted((examples[i] for i in perm[s : s + cfg.train_batch_size]), key=lambda e: len(e[0]))
            n_tok = sum(sum(t != -100 for t in y[1:]) for _, y in batch)  # the loss is a mean over these tokens
            rows = batch[RANK::WORLD]  # sorted by length, so every rank gets a similar share of tokens
            # every rank runs the same number of micro-steps (DDP and FSDP2 sync in the backward); a rank with
            # fewer rows repeats a row with weight 0
            steps = math.ceil(math.ceil(len(batch) / WORLD) / cfg.micro_batch_size)
            for m in range(steps):
                part, weight = rows[m * cfg.micro_batch_size : (m + 1) * cfg.micro_batch_size], 1.0
                if not part:
                    part, weight = batch[:1], 0.0
                sync = m == steps - 1 or not DIST  # gradients are reduced once, after the last micro-step
                if fsdp:
                    model.set_requires_gradient_sync(sync)
                with contextlib.nullcontext() if sync or fsdp else net.no_sync():
                    lp, n = example_logprobs(net, part, cfg.bf16)
                    (-lp.sum() * weight * WORLD / max(n_tok, 1)).backward()  # × WORLD: DDP averages over ranks
                loss_sum += torch.stack([-lp.detach().sum(), n.sum().float()]) * weight
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            crash_point("train", stage)
            pbar.update()
    pbar.close()
    model.eval()
    if WORLD > 1:
        torch.distributed.all_reduce(loss_sum)
    return (loss_sum[0] / loss_sum[1].clamp(min=1)).item()


# ---- the loop ----------------------------------------------------------------------------------------------
def stage_prompts(n: int, b: int, t: int, seed: int) -> tuple[list[int], bool]:
    """Indices of stage t's b prompts: positions (t-1)·b … t·b-1 of an endless stream of shuffled passes over the
    n prompts (pass e shuffled with seed + e), and whether a new pass began. Derived from (seed, t) alone, so a
    resumed run needs no saved position."""
    perms, idx, new_pass = {}, [], False
    for pos in range((t - 1) * b, t * b):
        e, k = divmod(pos, n)
        if e not in perms:
            perms[e] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)).tolist()
        new_pass |= k == 0 and pos > 0
        idx.append(perms[e][k])
    return idx, new_pass


def usable_prompts(cfg: Config, tok, context: int, split: str, responses=()) -> tuple[list[dict], str]:
    """Records of `split` (data.load_prompts), without duplicate prompts, whose prompt fits in --max_prompt_tokens
    and in the model's context with --max_new_tokens to spare (both counted); the resolved --prompt_format."""
    records, fmt, skipped = load_prompts(
        cfg.dataset, split, cfg.prompt_field, cfg.prompt_format, tok, cfg.chat_template, responses
    )
    if skipped:
        print0(f"{cfg.dataset} {split}: skipped {skipped} rows with no human text or an empty response")
    unique = list({r["prompt"]: r for r in records}.values())
    if len(unique) < len(records):
        print0(f"dropped {len(records) - len(unique)} duplicate prompts")
    limit = min(cfg.max_prompt_tokens, context - cfg.max_new_tokens)
    kept = [r for r in unique if len(encode_prompt(tok, r["prompt"])) <= limit]
    if len(kept) < len(unique):
        print0(
            f"dropped {len(unique) - len(kept)} of {len(unique)} prompts longer than {limit} tokens "
            f"(--max_prompt_tokens, or the model's context minus --max_new_tokens)"
        )
    return kept, fmt


def split_prompts(cfg: Config, tok, context: int):
    """The training and held-out prompt records: --eval_prompts drawn (by --seed) from --eval_split, or else taken
    out of the training prompts. Returns (train, eval, resolved prompt format)."""
    kept, fmt = usable_prompts(cfg, tok, context, cfg.dataset_split)
    held = usable_prompts(cfg, tok, context, cfg.eval_split)[0] if cfg.eval_split else kept
    if (
        len(held) < cfg.eval_prompts + (0 if cfg.eval_split else cfg.prompts_per_iter)
        or len(kept) < cfg.prompts_per_iter
    ):
        raise SystemExit(
            f"--dataset has {len(kept)} usable prompts after dropping duplicates and over-long ones "
            f"({len(held)} held-out), too few for --eval_prompts {cfg.eval_prompts} and "
            f"--prompts_per_iter {cfg.prompts_per_iter}; lower them or add prompts"
        )
    order = torch.randperm(len(held), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    eval_r = [held[i] for i in order[: cfg.eval_prompts]]
    train_r = kept if cfg.eval_split else [held[i] for i in order[cfg.eval_prompts :]]
    return train_r, eval_r, fmt


def evaluate(model, tok, prompts, reward_fn, cfg: Config, seed: int, kl=None) -> tuple[dict, list[dict]]:
    """One response per held-out prompt at the sampling temperature (each rank its shard): mean reward, text metrics,
    and with a KL reference a Monte-Carlo estimate of KL(π_θ || π_0) per response."""
    torch.manual_seed(seed + 100_003 * RANK)
    mine = shard(prompts)
    samples = generate(model, tok, mine, 1, cfg, desc="eval")
    stats = score_samples(tok, mine, samples, reward_fn, kl)
    rows = gather(
        [
            {"prompt": p, "response": s["text"], "reward": s["reward"], **({"log_ratio": s["log_ratio"]} if kl else {})}
            for p, (s,) in zip(mine, samples)
        ]
    )
    rewards = torch.tensor([r["reward"] for r in rows])
    m = {"eval_reward_mean": rewards.nanmean().item(), "eval_reward_std": _nanstd(rewards)}
    m.update({f"eval_{k}": v for k, v in stats.items()})  # per-reward means, reward-model truncations
    m.update({f"eval_{k}": v for k, v in text_metrics([r["response"] for r in rows]).items()})
    if kl:
        m["eval_kl_to_start"] = sum(r.pop("log_ratio") for r in rows) / len(rows)
    return m, rows


def _nanstd(x):
    x = x[~x.isnan()]
    return x.std().item() if len(x) > 1 else 0.0


def open_run_dir(cfg: Config):
    """Check --out_dir before anything expensive (rank 0): new and writable, or --resume with the same config.
    Returns the last completed stage (None: not even stage 0, the starting model's eval)."""
    if MASTER:
        check_run_dir(cfg)
    barrier()
    done = completed_stages(cfg.out_dir)
    return done[-1] if done else None


def make_logger(cfg: Config):
    """log(metrics, step) to tensorboard or wandb on rank 0; a no-op otherwise."""
    if not MASTER or cfg.report_to == "none":
        return lambda m, step: None
    if cfg.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        w = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))
        return lambda m, step: [w.add_scalar(k, v, step) for k, v in m.items() if isinstance(v, (int, float))]
    import wandb

    wandb.init(project="raft", config=dataclasses.asdict(cfg), dir=cfg.out_dir)
    return lambda m, step: wandb.log(m, step=step)


@contextlib.contextmanager
def phase(name: str, m: dict, device):
    """Time one phase into m["time_<name>"] (seconds) and, on a GPU, its peak allocated memory into
    m["peak_gib_<name>"] (this rank's; what --gen_batch_size, --micro_batch_size and the memory modes trade)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    yield
    m[f"time_{name}"] = time.time() - t0
    if cuda:
        m[f"peak_gib_{name}"] = torch.cuda.max_memory_allocated(device) / 2**30


def stage_line(m):
    s = f"stage {m['iteration']:>3} | eval reward {m['eval_reward_mean']:+.3f} distinct-2 {m['eval_distinct_2']:.3f}"
    if m["iteration"] > 0:
        s += (
            f" | samples {m['reward_mean']:+.3f} kept {m['selected_reward_mean']:+.3f} | sft loss "
            f"{m['sft_loss'] or math.nan:.3f} | s: gen {m['time_sample']:.0f} rank {m['time_rank']:.0f} "
            f"train {m['time_train']:.0f} eval {m['time_eval']:.0f}"
        )
        if "peak_gib_sample" in m:
            s += " | peak GiB: gen {peak_gib_sample:.1f} rank {peak_gib_rank:.1f} train {peak_gib_train:.1f}".format(
                **m
            )
    return s


def run(cfg: Config):
    """The RAFT loop. Returns the metrics rows (one per stage, stage 0 first) and the trained policy."""
    device = pick_device(cfg)
    start = open_run_dir(cfg)
    tok, context = load_tokenizer(cfg.model, cfg)  # prompts are formatted and measured before any model loads
    train_r, eval_r, fmt = split_prompts(cfg, tok, context)
    eval_p, train_p = [r["prompt"] for r in eval_r], [r["prompt"] for r in train_r]
    cfg = dataclasses.replace(cfg, stop=stop_strings(fmt, cfg.stop))  # HH: the next human turn ends a response
    view = {r["prompt"]: r["reward_prompt"] for r in train_r + eval_r}  # rewards score the ###Human text
    reward_fn = load_rewards(
        cfg.reward,
        cfg.reward_weights,
        cfg.reward_template,
        cfg.reward_batch_size,
        device,
        cfg.trust_remote_code,
        cfg.offload_reward,
        view,
        cfg.reward_load_in_8bit,
    )
    model, tok = load_policy(
        cfg, device, checkpoint=os.path.join(cfg.out_dir, f"iter_{start:04d}") if start else None, shard=DIST
    )
    kl = make_kl(cfg, model, device)
    gen_model, gen_tok = (
        (model, tok)
        if not cfg.generator_model
        else load_policy(
            dataclasses.replace(
                cfg, model=cfg.generator_model, lora_r=0, load_in_8bit=False, gradient_checkpointing=False
            ),
            device,
            frozen=True,
        )
    )
    initial = None
    if cfg.finetune_from == "base":  # the stage-0 values of what trains (all weights, or the seeded LoRA init)
        initial = trainable_state(load_policy(cfg, device, shard=DIST)[0] if start else model)
    log = make_logger(cfg)
    print0(
        f"RAFT: {len(train_p)} training prompts, {len(eval_p)} eval prompts, b={cfg.prompts_per_iter}, "
        f"K={cfg.K}, λ={cfg.temperature}, ranking={cfg.ranking}, {cfg.iterations} stages on {device}; "
        f"out_dir {cfg.out_dir}" + (f" (resuming after stage {start})" if start is not None else "")
    )

    if start is None:
        times = {}
        with phase("eval", times, device):
            m, eval_rows = evaluate(model, tok, eval_p, reward_fn, cfg, seed=cfg.seed * 1000, kl=kl)
        m = {"iteration": 0, **m, **times}
        if MASTER:
            save_stage(cfg.out_dir, 0, m, eval_rows=eval_rows)
        start = 0
    if MASTER:
        for row in write_metrics(cfg.out_dir, completed_stages(cfg.out_dir)):
            print0(stage_line(row))
    for t in range(start + 1, cfg.iterations + 1):
        times = {}
        idx, new_pass = stage_prompts(len(train_p), cfg.prompts_per_iter, t, cfg.seed)
        if new_pass:
            print0(f"stage {t}: all {len(train_p)} training prompts used; reshuffling and starting a new pass")
        batch = [train_p[i] for i in idx]
        mine = shard(batch)  # each rank samples and scores its share; ranking sees the whole batch
        with phase("sample", times, device):
            torch.manual_seed(cfg.seed * 1000 + t + 100_003 * RANK)  # seeded by (seed, stage, rank): resume repeats
            samples = generate(gen_model, gen_tok, mine, cfg.K, cfg)
            if cfg.generator_model:  # the policy trains on its own tokens of the generator's text
                for s in (s for row in samples for s in row):
                    s["ids"] = tok(s["text"], add_special_tokens=False)["input_ids"]
                    s["end_id"] = None if s["end_id"] is None else tok.eos_token_id
            crash_point("sample", t)
        with phase("rank", times, device):
            stats = score_samples(tok, mine, samples, reward_fn, kl)
            rows, kept, m = rank(batch, gather(samples), cfg, torch.Generator().manual_seed(cfg.seed + t))
            m.update(stats)
            examples = [example(tok, p, s) for p, s in kept]
        crash_point("rank", t)
        with phase("train", times, device):
            if examples:
                if initial:
                    with torch.no_grad():
                        for n, p in model.named_parameters():
                            if n in initial:
                                p.copy_(initial[n])
                m["sft_loss"] = finetune(model, examples, cfg, seed=cfg.seed * 1000 + t, stage=t)
            else:
                print0(f"stage {t}: every sample was discarded (NaN reward, empty, or --discard_regex); no fine-tuning")
                m["sft_loss"] = None
        with phase("eval", times, device):
            em, eval_rows = evaluate(model, tok, eval_p, reward_fn, cfg, seed=cfg.seed * 1000, kl=kl)
        m = {"iteration": t, **m, **em, **times}
        state = full_state_dict(model)  # FSDP2: gathered to rank 0 (every rank takes part)
        if MASTER:
            save_stage(
                cfg.out_dir,
                t,
                m,
                rows,
                eval_rows,
                model,
                tok,
                after_model=lambda: crash_point("save", t),
                state_dict=state,
            )
            prune_models(cfg.out_dir, cfg.keep_last)
            write_metrics(cfg.out_dir, completed_stages(cfg.out_dir))
        barrier()
        log(m, t)
        print0(stage_line(m))
    if cfg.merge_lora and MASTER:
        save_merged(cfg, os.path.join(cfg.out_dir, f"iter_{cfg.iterations:04d}"), os.path.join(cfg.out_dir, "merged"))
        print0(f"merged LoRA model: {os.path.join(cfg.out_dir, 'merged')}")
    barrier()
    with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f], model


# ---- --sft_only, the demo, the command line ----------------------------------------------------------------
def sft(cfg: Config) -> float:
    """--sft_only, the paper's starting point: SFT of --model on the (prompt, --sft_field) pairs of --dataset with the
    same `finetune` as a RAFT stage (prompt tokens carry no loss; EOS is trained, as a dataset response ends by
    itself), saved to --out_dir (written aside and renamed). Returns the mean token loss of the last epoch."""
    if os.path.isdir(cfg.out_dir) and os.listdir(cfg.out_dir):
        raise SystemExit(f"--out_dir {cfg.out_dir} is not empty; choose a new dir for the SFT model")
    device = pick_device(cfg)
    tok, ctx = load_tokenizer(cfg.model, cfg)
    records = usable_prompts(cfg, tok, ctx, cfg.dataset_split, responses=(cfg.sft_field,))[0]
    model, tok = load_policy(cfg, device, shard=DIST)
    examples = [build_example(*encode_pair(tok, r["prompt"], r[cfg.sft_field]), tok.eos_token_id) for r in records]
    fit = [e for e in examples if len(e[0]) <= ctx]
    if len(fit) < len(examples):
        print0(f"dropped {len(examples) - len(fit)} pairs longer than the model's context of {ctx} tokens")
    print0(f"SFT: {len(fit)} (prompt, {cfg.sft_field}) pairs, {cfg.epochs} epoch(s), lr {cfg.lr}, on {device}")
    t0 = time.time()
    loss = finetune(model, fit, cfg, seed=cfg.seed)
    state = full_state_dict(model)  # FSDP2: gathered to rank 0 (every rank takes part)
    if MASTER:  # out_dir is empty (checked above)
        save_model_dir(
            cfg.out_dir,
            model,
            tok,
            state,
            {
                "sft.json": json.dumps(
                    {"sft_loss": loss, "n_examples": len(fit), "config": dataclasses.asdict(cfg)}, indent=1
                )
            },
        )
    print0(
        f"SFT: last-epoch loss {loss:.3f} ({time.time() - t0:.0f}s); model saved to {cfg.out_dir} "
        f"(start RAFT from it with --model {cfg.out_dir})"
    )
    return loss


def prepare_demo(cfg: Config):
    """Build once (cached in --demo_dir) the demo's tiny Llama, pretrained with `finetune` on synthetic reviews of
    mixed sentiment, and its prompt file. Returns (model path, prompts file)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir, prompts_file = os.path.join(cfg.demo_dir, "model"), os.path.join(cfg.demo_dir, "prompts.jsonl")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        t0 = time.time()
        print0(f"demo: building the starting model in {model_dir} (once) ...")
        torch.manual_seed(0)
        reviews = demo_reviews(6000, seed=0)
        tok = train_demo_tokenizer(reviews)
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tok),
                hidden_size=128,
                intermediate_size=384,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=128,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                tie_word_embeddings=True,
            )
        )
        # the same SFT code as a RAFT stage, on whole reviews (the prompt is just BOS)
        examples = [
            build_example(encode_prompt(tok, ""), tok(r, add_special_tokens=False)["input_ids"], tok.eos_token_id)
            for r in reviews
        ]
        pre = dataclasses.replace(cfg, lr=3e-3, epochs=3, train_batch_size=32, micro_batch_size=32)
        loss = finetune(model, examples, pre, seed=0)
        save_model_dir(model_dir, model, tok)
        print0(f"demo: pretrained on {len(reviews)} reviews in {time.time() - t0:.0f}s (final loss {loss:.2f})")
    if not os.path.exists(prompts_file):
        write_jsonl(prompts_file, [{"prompt": p} for p in demo_prompts(2000, seed=1)])
    return model_dir, prompts_file


def parse(argv=None) -> Config:
    cfg = HfArgumentParser(Config).parse_args_into_dataclasses(args=argv)[0]
    if cfg.model is None:  # the offline demo: its values for every field still at the paper's default
        defaults = Config()
        for k, v in DEMO.items():
            if getattr(cfg, k) == getattr(defaults, k):
                setattr(cfg, k, v)
        cfg.reward = cfg.reward or ["reward:vader_sentiment"]
        cfg.dataset = cfg.dataset or os.path.join(cfg.demo_dir, "prompts.jsonl")
    cfg.out_dir = cfg.out_dir or ("runs/sft" if cfg.sft_only else "runs/raft")
    validate(cfg)
    return cfg


def main(argv=None):
    cfg = parse(argv)
    if cfg.dry_run:  # the options passed validate(); nothing is loaded
        print0(
            json.dumps(
                {**dataclasses.asdict(cfg), "world_size": WORLD, "prompts_per_rank": cfg.prompts_per_iter // WORLD},
                indent=1,
            )
        )
        return None
    own_group = DIST and not torch.distributed.is_initialized()
    if own_group:  # torchrun: NCCL between GPUs, gloo on CPU
        device = pick_device(cfg)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.sft_only:
        loss = sft(cfg)
        if own_group:
            torch.distributed.destroy_process_group()
        return loss
    demo = cfg.model is None
    if demo:
        if MASTER:
            prepare_demo(cfg)
        barrier()
        cfg.model = prepare_demo(cfg)[0]
    t0 = time.time()
    rows, _ = run(cfg)
    if demo and MASTER:
        first, last = rows[0], rows[-1]
        print0(
            f"\ndemo: held-out VADER reward {first['eval_reward_mean']:+.3f} -> {last['eval_reward_mean']:+.3f}, "
            f"distinct-2 {first['eval_distinct_2']:.3f} -> {last['eval_distinct_2']:.3f} ({time.time() - t0:.0f}s)"
        )
        for t in (first["iteration"], last["iteration"]):
            with open(os.path.join(cfg.out_dir, f"iter_{t:04d}", "eval_samples.jsonl")) as f:
                samples = [json.loads(line) for line in f][:4]
            print0(f"held-out samples after stage {t}:")
            for s in samples:
                print0(f"  [{s['reward']:+.2f}] {s['prompt']} >>{s['response']}")
    print0(f"outputs: {os.path.abspath(cfg.out_dir)} (metrics.jsonl, reward_curve.png, iter_XXXX/)")
    if own_group:
        torch.distributed.destroy_process_group()
    return rows


if __name__ == "__main__":
    main()
