"""RAFT: Reward rAnked FineTuning (Dong et al., TMLR 2023, arXiv 2304.06767), one stage after another:

  1. sample     the next b = --prompts_per_stage prompts of a shuffled stream; K responses each at temperature λ
  2. rank       score every (prompt, response) with --reward; keep the best per prompt (or as --ranking says)
  3. fine-tune  SFT of the current model on the kept set (response tokens and EOS; a fresh AdamW every stage)
Stage 0 evaluates the starting model on held-out prompts; every stage after it is evaluated and saved the same way.

    python raft.py --model M --dataset D --reward R                         # one process
    torchrun --nproc_per_node 8 raft.py --model M --dataset D --reward R --bf16   # the paper's 8 GPUs

Each rank samples and scores its share of the prompts; every rank ranks the whole gathered batch and trains on its
rows of it. The engines live in sampling.py, models.py and dist.py; docs/how-it-works.md follows this file. The
offline demo (`python demo.py`) builds a tiny model and calls main() on it; this file knows nothing of it.
"""

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import HfArgumentParser

import dist
from checks import validate
from data import check_run_dir, completed_stages, prune_models, save_stage, split_prompts, stage_prompts
from data import PROMPT_TEMPLATE, stop_strings, write_metrics
from dist import DIST, MASTER, RANK, WORLD, bar, barrier, crash_point, gather, make_logger, phase, pick_device, print0
from dist import quiet_libraries, shard
from metrics import evaluate, measure_policy, plot_rewards, score_samples, stage_line
from models import deal, dropout_off, example, example_major, fsdp_modules, full_state_dict, load_generator
from models import load_optimizer
from models import load_policy, load_tokenizer, make_kl, make_optimizer, optimizer_state, release, restore, retokenize
from models import save_merged, token_logprobs, trainable_state
from losses import advantages, binary, rl_batches, sft_batches, token_objective
from reward import TEMPLATE, load_rewards
from sampling import generate, sleep_engine, start_engine, sync_engine


def opt(default, help: str, **kw):
    """A Config field with its one-line --help (argparse reads % as a format character)."""
    if isinstance(default, list):
        return field(default_factory=list, metadata={"help": help.replace("%", "%%"), **kw})
    return field(default=default, metadata={"help": help.replace("%", "%%")})


@dataclass
class Config:  # defaults are the paper's; docs/options.md has each option's provenance and details
    # the paper's knobs
    prompts_per_stage: int = opt(2048, "b: prompts sampled per stage, over all processes (paper: 2048)")
    K: int = opt(8, "responses per prompt (paper: 8, 16, 32)")
    temperature: float = opt(1.0, "λ: sampling temperature; 0 is greedy (paper: 1.0)")
    top_k: int = opt(0, "top-k filter while sampling; 0 is off (paper: 0)")
    top_p: float = opt(1.0, "nucleus filter while sampling; 1 is off (paper: 1.0)")
    max_new_tokens: int = opt(128, "longest response in tokens (paper: 128)")
    ranking: str = opt("local", "local: best per prompt (paper); global: top b of b·K; random; positive; all")
    keep_threshold: float = opt(1.0, "a sample is correct when its reward is at least this (positive, --advantage)")
    lr: float = opt(2e-5, "peak learning rate of AdamW, decayed linearly to 0 within each stage (paper: 2e-5)")
    epochs: int = opt(2, "fine-tuning epochs over each stage's kept set (paper: 2)")
    regime: str = opt("raft", "raft: a fresh SFT each stage (paper); rl: --mini_batches steps, AdamW kept, constant lr")
    mini_batches: int = opt(4, "--regime rl: optimizer steps per stage, each on the kept samples of b/N prompts")
    advantage: str = opt("one", "a kept sample's weight: one (paper), correct (1/0), reinforce (±1) or grpo")
    drop_all_correct: bool = opt(False, "keep nothing of prompts whose valid samples are all correct")
    drop_all_wrong: bool = opt(False, "keep nothing of prompts with no correct sample")
    loss: str = opt("sft", "sft: A·log π (paper: the NLL); is: A·π_θ/π_old; clip: PPO's clipped ratio (RAFT++)")
    clip_eps: float = opt(0.2, "--loss clip: the ratio is clipped to [1 − ε, 1 + ε_high]")
    clip_eps_high: Optional[float] = opt(None, "--loss clip: ε_high (default: --clip_eps; DAPO: 0.28)")
    loss_agg: str = opt("token", "token: mean over the step's tokens (verl); sequence: per sequence, then over them")
    stages: int = opt(10, "RAFT stages (paper: about 10 to 18, until the reward stops rising)")
    # model, data, reward
    model: Optional[str] = opt(None, "hub id or path of the causal LM to align (python demo.py: the offline demo)")
    dataset: Optional[str] = opt(None, "a .jsonl/.json file or a dataset name with a prompt field")
    dataset_split: str = opt("train", "split (or key of a .json object) with the training prompts")
    prompt_field: str = opt("prompt", "the field that holds the prompt text")
    prompt_format: str = opt("auto", "raw, hh (HH-RLHF as ###Human/###Assistant text), gsm8k, math or auto")
    prompt_template: str = opt(PROMPT_TEMPLATE, "gsm8k and math rows: the prompt, with {question} for the problem")
    chat_template: bool = opt(False, "render prompts with the tokenizer's chat template")
    eval_split: Optional[str] = opt(None, "take held-out prompts from this split, else out of the training prompts")
    eval_prompts: int = opt(4608, "held-out prompts evaluated every stage (paper: 4,608)")
    eval_samples: int = opt(1, "responses per held-out prompt (several for pass@k)")
    pass_k: str = opt("", "report held-out pass@k for these k, e.g. 1,8 (0/1 rewards; k ≤ --eval_samples)")
    max_prompt_tokens: int = opt(256, "drop longer prompts (paper: 256)")
    reward: list[str] = opt([], "file.py:function, module:function or a reward model; repeat to add", action="extend")
    reward_weights: str = opt("", "weights of several --reward, e.g. 1,0.5 (default: all 1)")
    reward_template: str = opt(TEMPLATE, "the text a reward model scores")
    reward_batch_size: int = opt(32, "texts per reward-model forward pass")
    reward_load_in_8bit: bool = opt(False, "load reward models in 8-bit (bitsandbytes)")
    offload_reward: bool = opt(False, "keep reward models on the CPU except while scoring")
    stop: list[str] = opt([], "strings that end a response (hh: the next human turn)")
    # ablations of the paper
    kl_beta: float = opt(0.0, "rank by r − β·log(p_θ/p_0), p_0 the stage-0 model (paper Table 7)")
    eval_kl: bool = opt(False, "report the KL to the stage-0 model even when --kl_beta is 0")
    discard_regex: Optional[str] = opt(None, "never keep responses that match this regex (paper: '#')")
    generator_model: Optional[str] = opt(None, "another causal LM samples; the policy trains (paper Table 8)")
    finetune_from: str = opt("current", "current: fine-tune the current model; base: restart from stage 0 each stage")
    # fine-tuning
    train_batch_size: int = opt(32, "global fine-tuning batch in samples, over all processes")
    micro_batch_size: int = opt(8, "at most this many samples per forward pass on one process")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    # memory: small GPUs and full precision
    bf16: bool = opt(False, "compute in bf16 under autocast (fp32 master weights for full fine-tuning)")
    lora_r: int = opt(0, "LoRA rank; 0 is full fine-tuning")
    lora_alpha: int = opt(32, "LoRA alpha")
    lora_dropout: float = opt(0.05, "LoRA dropout")
    lora_target_modules: str = opt("all-linear", "comma-separated modules that get adapters, or all-linear")
    load_in_8bit: bool = opt(False, "8-bit frozen base under LoRA (bitsandbytes)")
    gen_dequantized: bool = opt(False, "with --load_in_8bit: sample from a dequantized copy (faster, +2 B/param)")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass")
    merge_lora: bool = opt(False, "at the end also save the base with the adapters merged in, to out_dir/merged")
    # sampling engine
    gen_backend: str = opt("fast", "fast (fastgen.py), hf (model.generate) or vllm")
    gen_batch_size: int = opt(64, "prompts sampled together (× K rows); lower it if memory runs out")
    cuda_graphs: bool = opt(True, "fast backend on a GPU: replay each decoding step as a CUDA graph")
    vllm_memory: float = opt(0.3, "vllm backend: the share of GPU memory the engine takes (weights and KV cache)")
    vllm_dtype: str = opt("auto", "vllm backend: the engine's dtype; auto: bfloat16 on a GPU, float32 on CPU")
    # the run
    seed: int = opt(42, "seeds prompt order, sampling, selection and training order")
    out_dir: Optional[str] = opt(None, "the run directory (default runs/raft; demo.py: runs/demo)")
    resume: bool = opt(False, "continue from the last completed stage in --out_dir")
    resume_force: bool = opt(False, "with --resume: accept a config that differs from the saved one")
    keep_last: int = opt(0, "keep the model files of only the last N stages (0: all)")
    report_to: str = opt("none", "none, tensorboard or wandb")
    # system
    device: str = opt("auto", "auto, cpu or cuda")
    trust_remote_code: bool = opt(False, "allow model repositories to run their own code")
    dry_run: bool = opt(False, "check the options, print the resolved configuration and exit")


# ---- step 1: sample ----------------------------------------------------------------------------------------------
def sample(gen_model, gen_tok, tok, prompts: list[str], cfg: Config, t: int, engine=None) -> list[list[dict]]:
    """K responses for each of this rank's prompts, seeded by (seed, stage, rank) so a resumed run repeats them."""
    torch.manual_seed(cfg.seed * 1000 + t + 100_003 * RANK)
    samples = generate(gen_model, gen_tok, prompts, cfg.K, cfg, engine=engine)
    if gen_tok is not tok:  # --generator_model: the policy trains on its own tokens of the generator's text
        retokenize(samples, tok)
    return samples


# ---- step 2: rank ------------------------------------------------------------------------------------------------
def select(scores: torch.Tensor, valid: torch.Tensor, mode: str, gen: torch.Generator, threshold=1.0):
    """Which samples to keep, from scores and valid [b, K]: sorted (prompt, sample) pairs. local: the best valid
    sample per prompt; global: the b best valid samples of all b·K; random: a uniformly random valid one per prompt;
    positive: every valid sample scoring at least threshold (0/1 rewards: every correct one); all: every valid sample.
    Prompts without a valid sample are skipped."""
    b, K = scores.shape
    if mode in ("positive", "all"):
        return [(int(i), int(j)) for i, j in (valid & ((scores >= threshold) | (mode == "all"))).nonzero()]
    if mode == "global":
        flat = scores.masked_fill(~valid, -math.inf).flatten()
        order = torch.sort(flat, descending=True, stable=True).indices[: min(b, int(valid.sum()))]
        return sorted((int(i) // K, int(i) % K) for i in order)
    rows = valid.any(1).nonzero().flatten()
    if mode == "local":
        picks = scores.masked_fill(~valid, -math.inf).argmax(1)[rows]
    else:
        picks = torch.multinomial(valid[rows].float(), 1, generator=gen).flatten()
    return [(int(i), int(j)) for i, j in zip(rows, picks)]


def rank_samples(prompts, samples, cfg: Config, gen):
    """Select from the scored samples[b][K] of the whole batch: (rows for selected.jsonl, kept (prompt, sample,
    advantage) triples, metrics). Empty responses, --discard_regex matches and NaN rewards are never kept."""
    b, K = len(prompts), cfg.K
    flat = [s for row in samples for s in row]
    rewards = torch.tensor([s["reward"] for s in flat]).view(b, K)
    empty = torch.tensor([not s["ids"] for s in flat]).view(b, K)
    discard = torch.tensor([bool(cfg.discard_regex and re.search(cfg.discard_regex, s["text"])) for s in flat])
    discard = discard.view(b, K)
    valid = ~rewards.isnan() & ~empty & ~discard
    scores, m = rewards, {}
    if "log_ratio" in flat[0]:  # r − β·(log p_θ(y|x) − log p_0(y|x)): the KL penalty of the paper's Table 7
        log_ratio = torch.tensor([s["log_ratio"] for s in flat]).view(b, K)
        scores = rewards - cfg.kl_beta * log_ratio
        m["kl_to_start"] = log_ratio.mean().item()
    keep = select(scores.masked_fill(~valid, 0.0), valid, cfg.ranking, gen, cfg.keep_threshold)
    keep, all_good, no_good = advantages(rewards, valid, keep, cfg.advantage, cfg.keep_threshold,
                                         cfg.drop_all_correct, cfg.drop_all_wrong)  # fmt: skip
    if binary(cfg):  # prompts whose K samples all agree carry no signal between samples (docs/reasoning.md)
        m.update(prompts_all_correct=all_good.float().mean().item(), prompts_none_correct=no_good.float().mean().item(),
                 kept_per_prompt=len(keep) / b)  # fmt: skip
    rows = [{"prompt": prompts[i], "response": samples[i][j]["text"], "reward": rewards[i, j].item(),
             "rewards": rewards[i].tolist(), "ended": samples[i][j]["end_id"] is not None,
             **({"advantage": a} if cfg.advantage != "one" else {})} for i, j, a in keep]  # fmt: skip
    kept = torch.tensor([r["reward"] for r in rows]) if rows else torch.tensor([math.nan])
    m.update(reward_mean=rewards.nanmean().item(), selected_reward_mean=kept.mean().item(), n_selected=len(keep),
             prompts_skipped=int((~valid.any(1)).sum()), samples_nan_reward=int(rewards.isnan().sum()),
             samples_empty=int(empty.sum()), samples_discarded=int(discard.sum()),
             samples_truncated=sum(s["end_id"] is None for s in flat),
             response_length=sum(len(s["ids"]) for s in flat) / len(flat))  # fmt: skip
    return rows, keep, m


# ---- step 3: fine-tune -------------------------------------------------------------------------------------------
def finetune(model, examples, cfg: Config, seed: int, stage=0, spread=True, kept=None, old=None, opt=None,
             stats=None, measured=None) -> float:  # fmt: skip
    """Fine-tune on examples [(input_ids, labels)] made from kept [(prompt, sample, advantage)] (None: advantage 1),
    with π_old's per-token log-probs old for --loss is/clip (None: a single step's own, detached); returns the last
    epoch's mean token NLL. --regime raft: --epochs of --train_batch_size batches, a fresh AdamW decayed to 0; rl:
    --mini_batches steps by prompt, AdamW `opt` kept, constant rate. Under torchrun (spread) every rank takes every
    WORLD-th row of each batch. measured: measure_policy's finish, given this forward's entropy and token sums."""
    rank, world = (RANK, WORLD) if spread else (0, 1)
    model.train()
    if cfg.loss != "sft":
        dropout_off(model)  # the ratio to π_old (computed without dropout) starts at exactly 1
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = opt or make_optimizer(model, cfg)
    fsdp = bool(fsdp_modules(model))
    net = torch.nn.parallel.DistributedDataParallel(model) if DIST and spread and not fsdp else model
    gen = torch.Generator().manual_seed(seed)
    if cfg.regime == "rl":
        epochs, sched = [rl_batches([k[0] for k in kept], cfg.prompts_per_stage, cfg.mini_batches, gen)], None
    else:
        epochs = sft_batches(len(examples), cfg.epochs, cfg.train_batch_size, gen)
        total = sum(map(len, epochs))  # the real number of optimizer steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / total)  # linear decay to 0
    temp = (cfg.temperature or 1.0) if cfg.loss != "sft" else 1.0  # the ratio compares the tempered distributions
    eps_high = cfg.clip_eps_high or cfg.clip_eps
    lengths = torch.tensor([sum(t != -100 for t in y[1:]) for _, y in examples], device=device)
    adv = torch.tensor([k[2] for k in kept] if kept else [1.0] * len(examples), device=device)
    pbar = bar(range(sum(map(len, epochs))), "train")
    tally = torch.zeros(3, device=device)  # clipped tokens (--loss clip), all tokens, their entropy (measured)
    for batches in epochs:
        loss_sum = torch.zeros(2, device=device)  # this rank's summed token loss and token count, this epoch
        for batch in batches:
            n_tok, n_seq = int(lengths[batch].sum()), len(batch)  # the loss averages over these
            ranks = deal(examples, batch, world)  # by prompt: its samples share its tokens in one forward
            rows = ranks[rank]
            # every rank runs the same number of micro-steps (DDP and FSDP2 sync in the backward); a rank with fewer
            # rows repeats a row with weight 0
            steps = max(math.ceil(len(r) / cfg.micro_batch_size) for r in ranks)
            for m in range(steps):
                part, weight = rows[m * cfg.micro_batch_size : (m + 1) * cfg.micro_batch_size], 1.0
                if not part:
                    part, weight = batch[:1], 0.0
                sync = m == steps - 1  # gradients are reduced once, after the last micro-step
                if fsdp:
                    model.set_requires_gradient_sync(sync)
                with net.no_sync() if net is not model and not sync else contextlib.nullcontext():
                    lp, seg, ent = token_logprobs(net, [examples[i] for i in part], cfg.bf16, temperature=temp,
                                                  entropy=measured and (cfg.temperature or 1.0))  # fmt: skip
                    old_lp = torch.cat([old[i] for i in part]).to(device)[example_major(seg)] if old else lp.detach()
                    obj, held = token_objective(lp, old_lp, adv[part][seg], cfg.loss, cfg.clip_eps, eps_high)
                    n = torch.tensor(len(held), device=device)
                    tally += torch.stack([held.sum(), n, ent.sum() if measured else n * 0]) * weight
                    if cfg.loss_agg == "token":
                        loss = -obj.sum() / max(n_tok, 1)
                    else:  # each sequence's token mean, then the mean over the step's sequences
                        loss = -(obj / lengths[part][seg].clamp(min=1)).sum() / n_seq
                    (loss * weight * world).backward()  # × world: DDP averages over ranks
                loss_sum += torch.stack([-lp.detach().sum(), torch.tensor(len(lp), device=device)]) * weight
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            if sched:
                sched.step()
            opt.zero_grad(set_to_none=True)
            crash_point("train", stage)
            pbar.update()
    pbar.close()
    model.eval()
    if world > 1:
        torch.distributed.all_reduce(loss_sum)
        torch.distributed.all_reduce(tally)
    if measured:
        measured(tally[2].item(), tally[1].item())
    if stats is not None and cfg.loss == "clip":
        stats["clip_frac"] = (tally[0] / tally[1].clamp(min=1)).item()
    return (loss_sum[0] / loss_sum[1].clamp(min=1)).item()


# ---- the loop ----------------------------------------------------------------------------------------------------
def run(cfg: Config):
    """The RAFT loop. Returns the metrics rows (one per stage, stage 0 first) and the trained policy."""
    device = pick_device(cfg.device)
    if MASTER:
        check_run_dir(cfg)  # before anything expensive: writable, and new or --resume with the same config
    barrier()
    done = completed_stages(cfg.out_dir)
    start = done[-1] if done else None  # None: not even stage 0 (the starting model's eval) is done
    tok, context = load_tokenizer(cfg.model, cfg)  # prompts are formatted and measured before any model loads
    train_r, eval_r, fmt = split_prompts(cfg, tok, context, log=print0)
    eval_p, train_p = [r["prompt"] for r in eval_r], [r["prompt"] for r in train_r]
    cfg = dataclasses.replace(cfg, stop=stop_strings(fmt, cfg.stop))  # HH: the next human turn ends a response
    view = {r["prompt"]: r["reward_prompt"] for r in train_r + eval_r}  # rewards score the ###Human text
    columns = {r["prompt"]: r["columns"] for r in train_r + eval_r}  # and may see the dataset's answer column
    reward_fn = load_rewards(cfg.reward, cfg.reward_weights, view, columns, template=cfg.reward_template,
                             batch_size=cfg.reward_batch_size, device=device, trust_remote_code=cfg.trust_remote_code,
                             offload=cfg.offload_reward, load_in_8bit=cfg.reward_load_in_8bit)  # fmt: skip
    checkpoint = os.path.join(cfg.out_dir, f"stage_{start:04d}") if start else None
    model, tok = load_policy(cfg, device, checkpoint=checkpoint, shard=DIST)
    kl = make_kl(cfg, model, device)
    gen_model, gen_tok = load_generator(cfg, model, tok, device)
    engine = start_engine(cfg, model, device, os.path.join(cfg.out_dir, "vllm"), context)  # None but for vllm
    opt = make_optimizer(model, cfg) if cfg.regime == "rl" else None  # the RL regime's AdamW lives across stages
    if opt and checkpoint:
        load_optimizer(model, opt, os.path.join(checkpoint, "optimizer.pt"))
    initial = None
    if cfg.finetune_from == "base":  # the stage-0 values of what trains (all weights, or the seeded LoRA init)
        initial = trainable_state(load_policy(cfg, device, shard=DIST)[0] if start else model)
    log = make_logger(cfg.report_to, cfg.out_dir, dataclasses.asdict(cfg))
    print0(f"RAFT: {len(train_p)} training prompts, {len(eval_p)} eval prompts, b={cfg.prompts_per_stage}, "
           f"K={cfg.K}, λ={cfg.temperature}, ranking={cfg.ranking}, {cfg.stages} stages on {device}; "
           f"out_dir {cfg.out_dir}" + (f" (resuming after stage {start})" if start is not None else ""))  # fmt: skip

    def save(t, m, rows, eval_rows, model=None):
        state = full_state_dict(model) if model is not None else None  # FSDP2: gathered to rank 0 (a collective)
        extra = {"optimizer.pt": optimizer_state(model, opt)} if opt and model is not None else {}  # likewise
        shown = None
        if MASTER:
            save_stage(cfg.out_dir, t, m, rows, eval_rows, model, tok, lambda: crash_point("save", t), state, extra)
            prune_models(cfg.out_dir, cfg.keep_last)
            shown = summary()
        barrier()
        return shown

    def summary():  # metrics.jsonl and the plot, rebuilt from the stage directories (rank 0)
        rows = write_metrics(cfg.out_dir, completed_stages(cfg.out_dir))
        plot_rewards(rows, os.path.join(cfg.out_dir, "reward_curve.png"))
        return rows

    if start is None:
        m = {}
        with phase("eval", m, device):
            em, eval_rows = evaluate(model, tok, eval_p, reward_fn, cfg, seed=cfg.seed * 1000, kl=kl, engine=engine)
        shown = save(0, {"stage": 0, **em, **m}, None, eval_rows)
        start = 0
    else:
        shown = summary() if MASTER else None  # also mends a metrics.jsonl that a crash left behind
    for row in shown or []:
        print0(stage_line(row))
    for t in range(start + 1, cfg.stages + 1):
        times = {}
        idx, new_pass = stage_prompts(len(train_p), cfg.prompts_per_stage, t, cfg.seed)
        if new_pass:
            print0(f"stage {t}: all {len(train_p)} training prompts used; reshuffling and starting a new pass")
        batch = [train_p[i] for i in idx]
        mine = shard(batch)  # each rank samples and scores its share; ranking sees the whole batch
        with phase("sample", times, device):
            samples = sample(gen_model, gen_tok, tok, mine, cfg, t, engine)
            crash_point("sample", t)
        with phase("rank", times, device):
            # the KL term of each sample: for ranking by it, and as kl_to_start (the RL regime's kl_low_var covers it)
            stats = score_samples(tok, mine, samples, reward_fn, kl if cfg.kl_beta or cfg.regime == "raft" else None)
            every = gather(samples)
            rows, kept, m = rank_samples(batch, every, cfg, torch.Generator().manual_seed(cfg.seed + t))
            rows = [{**r, **{c: columns[r["prompt"]][c] for c in reward_fn.columns}} for r in rows]
            examples = [example(tok, batch[i], every[i][j]) for i, j, _ in kept]
        crash_point("rank", t)
        with phase("train", times, device):
            sleep_engine(engine, cfg)
            # the policy that sampled, before any update or reset: π_old, entropy (collapse shows here), KL to start
            old, finish = measure_policy(model, tok, batch, every, kept, cfg, kl, m)
            restore(model, initial)  # --finetune_from base: back to the stage-0 weights (None: a no-op)
            if not examples:
                print0(f"stage {t}: every sample was discarded (NaN reward, empty, or --discard_regex); no fine-tuning")
            m["sft_loss"] = finetune(model, examples, cfg, cfg.seed * 1000 + t, t, kept=kept, old=old, opt=opt,
                                     stats=m, measured=finish) if examples else None  # fmt: skip
            sync_engine(engine, model, cfg)  # the engine samples from the new weights from now on
        with phase("eval", times, device):
            em, eval_rows = evaluate(model, tok, eval_p, reward_fn, cfg, seed=cfg.seed * 1000, kl=kl, engine=engine)
        m = {"stage": t, **m, **stats, **em, **times}
        save(t, m, rows, eval_rows, model)
        log(m, t)
        print0(stage_line(m))
    if cfg.merge_lora and MASTER:
        save_merged(cfg, os.path.join(cfg.out_dir, f"stage_{cfg.stages:04d}"), os.path.join(cfg.out_dir, "merged"))
    release(model)
    barrier()
    with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f], model


# ---- the command line --------------------------------------------------------------------------------------------
def parse(argv=None) -> Config:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = HfArgumentParser(Config).parse_args_into_dataclasses(args=argv)[0]
    cfg.out_dir = cfg.out_dir or "runs/raft"
    validate(cfg)
    return cfg


def main(argv=None):
    cfg = parse(argv)
    if cfg.dry_run:  # the options passed validate(); nothing is loaded
        print0(json.dumps({**dataclasses.asdict(cfg), "world_size": WORLD,
                           "prompts_per_rank": cfg.prompts_per_stage // WORLD}, indent=1))  # fmt: skip
        return None
    quiet_libraries()
    own = dist.start(pick_device(cfg.device))  # False under demo.py, which started it
    rows, _ = run(cfg)
    print0(f"outputs: {os.path.abspath(cfg.out_dir)} (metrics.jsonl, reward_curve.png, stage_XXXX/)")
    dist.stop(own)
    return rows


if __name__ == "__main__":
    main()
    dist.exit_worker()
