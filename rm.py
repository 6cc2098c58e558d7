"""A reward model from preference pairs, the paper's second step (its HH-RLHF reward model: Open-LLaMA-3B after SFT,
trained 1 epoch at lr 5e-6 on chosen/rejected pairs; 75.48% held-out accuracy as its model card reports):

    python rm.py --model M --dataset Dahoas/full-hh-rlhf --eval_split test --out_dir runs/rm
    torchrun --nproc_per_node 8 rm.py ... --bf16        # FSDP2 (full) or DDP (LoRA), as raft.py
    python raft.py --model P --dataset D --reward runs/rm   # the saved directory is a reward (eval.py too)

A one-output sequence-classification head on any causal LM (an sft.py output included) learns r(x, y) with the
Bradley–Terry loss −log σ(r(x, y_chosen) − r(x, y_rejected) − margin), the margin from a column if the rows have one.
Pairs come from prompt/chosen/rejected rows (Dahoas/full-hh-rlhf, any .jsonl or hub set), from two whole dialogues
that share a prefix (Anthropic/hh-rlhf: split after the last assistant cue they share) or from chat rows (lists of
messages). The prompt becomes the text rewards see at RAFT time (data.py: the `###Human` text for HH-RLHF), and a pair
is the ids reward.py scores (`reward_ids`: --reward_template, or the tokenizer's chat template with --chat_template);
rm.json in the saved directory tells reward.py which, so a loaded directory scores exactly as the evaluation here did.
Bad rows are counted and skipped; bad options and files are one-line errors before any model loads.
"""

import contextlib
import dataclasses
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass

import torch
from transformers import HfArgumentParser

import dist
from data import hh_text, hh_turns, held_out, load_rows, resolve_format, save_model_dir, write_jsonl
from dist import DIST, MASTER, RANK, WORLD, bar, barrier, gather, pick_device, print0, shard
from losses import sft_batches
from models import amp, fsdp_modules, full_state_dict, full_weights, load_policy, load_tokenizer, make_optimizer
from models import pad_id, release
from raft import Config, opt, validate
from reward import RM_FILE, reward_ids, score_ids

_ASSISTANT = "\n\nAssistant:"  # Anthropic/hh-rlhf: the cue after which the two dialogues' answers differ


@dataclass
class RMConfig(Config):  # raft.py's options where they apply (memory modes, batches, data); these differ or are new
    lr: float = opt(5e-6, "peak AdamW rate, decayed linearly to 0 (the paper's reward model: 5e-6)")
    epochs: int = opt(1, "passes over the training pairs (the paper's reward model: 1; more overfit)")
    weight_decay: float = opt(0.001, "AdamW weight decay (LMFlow's reward-modeling scripts: 0.001)")
    max_length: int = opt(512, "drop pairs whose chosen or rejected text is longer, in tokens (paper's RM: 512)")
    eval_pairs: int = opt(1000, "held-out pairs: drawn from --eval_split, else out of the training pairs")
    eval_every: int = opt(100, "held-out evaluation every N optimizer steps, and at the start and the end")
    margin_field: str = opt("margin", "a numeric column subtracted from r_chosen − r_rejected in the loss, if present")


def check(cfg: RMConfig):
    """Every check that needs no model, with the fix in the message."""
    if not cfg.model or not cfg.dataset:
        raise SystemExit("rm.py needs --model (a causal LM) and --dataset (preference pairs)")
    cfg.out_dir = cfg.out_dir or "runs/rm"
    if os.path.isfile(cfg.out_dir):
        raise SystemExit(f"--out_dir {cfg.out_dir} is a file; give a directory for the reward model")
    if os.path.isdir(cfg.out_dir) and os.listdir(cfg.out_dir):
        raise SystemExit(f"--out_dir {cfg.out_dir} is not empty; choose a new dir for the reward model")
    validate(cfg, needs_reward=False)
    rules = [(cfg.max_length >= 2, "--max_length must be ≥ 2"), (cfg.eval_pairs >= 0, "--eval_pairs must be ≥ 0"),
             (cfg.eval_every >= 0, "--eval_every must be ≥ 0 (0: only at the start and the end)"),
             (cfg.prompt_format in ("auto", "hh", "raw"), "--prompt_format: rm.py takes auto, hh or raw"),
             ("{response}" in cfg.reward_template, "--reward_template needs {response}, the text being judged"),
             (not cfg.merge_lora, "--merge_lora: reward.py loads a LoRA reward model as it is")]  # fmt: skip
    for ok, msg in rules:
        if not ok:
            raise SystemExit(f"config error: {msg}")


# ---- the loss and the accuracy ---------------------------------------------------------------------------------
def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin=None) -> torch.Tensor:
    """Per pair −log σ(r_chosen − r_rejected − margin): the Bradley–Terry model's negative log-likelihood."""
    return -torch.nn.functional.logsigmoid(chosen - rejected - (0.0 if margin is None else margin))


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """The share of pairs the model orders right; a tie counts one half (a coin would break it)."""
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean().item()


# ---- preference rows to pairs ----------------------------------------------------------------------------------
def _text(x) -> bool:
    return isinstance(x, str) and bool(x.strip())


def _split_dialogues(chosen: str, rejected: str):
    """Anthropic/hh-rlhf: (prompt, chosen answer, rejected answer) of two dialogues that share everything up to the
    last assistant cue; None when they share no cue."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(_ASSISTANT, 0, n)  # the cue lies wholly in the shared part
    if cut < 0:
        return None
    cut += len(_ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _chat_pair(row: dict, field: str):
    """Chat rows: (turns, chosen answer, rejected answer) from message lists; the prompt is row[field] when it is a
    list of messages, else everything but the last message, which both sides must share. A string says why not."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not all(isinstance(x, list) and x and all(isinstance(m, dict) for m in x) for x in (chosen, rejected)):
        return "an empty, null or missing text"
    prompt = row[field] if isinstance(row.get(field), list) else chosen[:-1]
    if not isinstance(row.get(field), list) and chosen[:-1] != rejected[:-1]:
        return "no shared prompt"
    last = [chosen[-1], rejected[-1]]
    if any(m.get("role") != "assistant" or not _text(m.get("content")) for m in last):
        return "an empty, null or missing text"
    roles = {"user": "Human", "assistant": "Assistant"}
    if any(m.get("role") not in roles or not isinstance(m.get("content"), str) for m in prompt):
        return "a system or unknown role"
    return [(roles[m["role"]], m["content"].strip()) for m in prompt], last[0]["content"], last[1]["content"]


def preference_pairs(rows, cfg, name: str) -> tuple[list[dict], str, Counter]:
    """(pairs, prompt format, skipped rows by reason): each pair {row, prompt, chosen, rejected, margin}, its prompt in
    the text rewards see (hh: the `###Human` text; raw: as it is). A dataset without chosen/rejected fields is a
    one-line error; a bad row is a counted skip."""
    first = next((r for r in rows if isinstance(r, dict)), {})
    if not {"chosen", "rejected"} <= set(first):
        raise SystemExit(f"{name}: preference rows need 'chosen' and 'rejected' fields (and 'prompt' unless they are "
                         f"whole dialogues); the first row has {sorted(first)}")  # fmt: skip
    chat = isinstance(first["chosen"], list)
    fmt = "hh" if chat else resolve_format(cfg.prompt_format, rows)  # auto: hh, as raft.py reads the same rows
    pairs, skipped = [], Counter()
    for i, row in enumerate(rows):
        row = row if isinstance(row, dict) else {}
        margin = row.get(cfg.margin_field, 0.0)
        if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not math.isfinite(margin):
            skipped[f"a {cfg.margin_field!r} that is not a number"] += 1
            continue
        if chat:
            got = _chat_pair(row, cfg.prompt_field)
            if isinstance(got, str):
                skipped[got] += 1
                continue
            turns, a, b = got
            prompt = hh_text(turns)  # messages are turns: the `###Human` text, as for HH-RLHF
        else:
            a, b = row.get("chosen"), row.get("rejected")
            if not (_text(a) and _text(b)):
                skipped["an empty, null or missing text"] += 1
                continue
            if cfg.prompt_field in row:
                prompt = row[cfg.prompt_field]
            else:
                got = _split_dialogues(a, b)
                if got is None:
                    skipped["no shared prompt"] += 1
                    continue
                prompt, a, b = got
            if not isinstance(prompt, str):
                skipped["an empty, null or missing text"] += 1
                continue
            turns = hh_turns(prompt) if fmt == "hh" else [("Human", prompt)]
            if fmt == "hh":
                prompt = hh_text(turns)
        if not any(r == "Human" and t.strip() for r, t in turns) or not (_text(a) and _text(b)):
            skipped["an empty, null or missing text"] += 1
        elif a.strip() == b.strip():
            skipped["chosen identical to rejected"] += 1
        else:
            pairs.append({"row": i, "prompt": prompt, "chosen": a.strip(), "rejected": b.strip(), "margin": margin})
    return pairs, fmt, skipped


def encode_pairs(tok, pairs: list[dict], cfg, limit: int, name: str, log=print0) -> list[dict]:
    """Adds the ids reward.py scores (`reward_ids`) to every pair; drops and counts pairs with a text over `limit`."""
    prompts = [p["prompt"] for p in pairs]
    for side in ("chosen", "rejected"):
        ids = reward_ids(tok, prompts, [p[side] for p in pairs], cfg.reward_template, cfg.chat_template)
        for p, x in zip(pairs, ids):
            p[f"{side}_ids"] = x
    fit = [p for p in pairs if max(len(p["chosen_ids"]), len(p["rejected_ids"])) <= limit]
    if len(fit) < len(pairs):
        log(f"{name}: dropped {len(pairs) - len(fit)} of {len(pairs)} pairs whose chosen or rejected text is longer "
            f"than {limit} tokens (--max_length, or the model's context): the whole pair is left out")  # fmt: skip
    return fit


def load_pairs(cfg, tok, split: str, limit: int) -> tuple[list[dict], str]:
    """The usable, encoded pairs of a split and the prompt format, with the skips said in one line."""
    rows = load_rows(cfg.dataset, split)
    name = f"--dataset {cfg.dataset} {split}"
    pairs, fmt, skipped = preference_pairs(rows, cfg, name)
    if skipped:
        print0(f"{name}: skipped {sum(skipped.values())} of {len(rows)} rows: "
               + ", ".join(f"{n} with {why}" for why, n in skipped.most_common()))  # fmt: skip
    pairs = encode_pairs(tok, pairs, cfg, limit, name) if pairs else []
    if not pairs:
        raise SystemExit(f"{name}: no usable preference pair in {len(rows)} rows (see the skips above); fix the data")
    return pairs, fmt


# ---- training and evaluation -----------------------------------------------------------------------------------
def pair_forward(net, pairs: list[dict], bf16: bool, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen and rejected texts of pairs ([n], [n]) in one right-padded forward pass (the head reads
    the last token that is not padding, as reward.score_ids has it)."""
    seqs = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    ids = torch.full((len(seqs), max(map(len, seqs))), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), 1
    model = getattr(net, "module", net)
    device = next(model.parameters()).device
    with amp(model, bf16):
        out = net(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits[:, 0].float()
    return out[: len(pairs)], out[len(pairs) :]


@torch.no_grad()
def evaluate_pairs(model, held: list[dict], cfg, pad: int) -> tuple[dict, list[list[float]]]:
    """Held-out loss, accuracy and mean margin r_chosen − r_rejected, scored by reward.score_ids (what a loaded
    reward model runs), each rank its share; and every pair's [chosen, rejected] scores."""
    if not held:
        return {}, []
    model.eval()
    enc = [p[f"{side}_ids"] for p in held for side in ("chosen", "rejected")]
    with full_weights(model), amp(model, cfg.bf16):  # no collectives inside: ranks may score different batches
        mine = score_ids(model, shard(enc), cfg.reward_batch_size, pad)
    scores = torch.tensor(gather(mine)).view(-1, 2)
    c, r = scores[:, 0], scores[:, 1]
    margin = torch.tensor([p["margin"] for p in held], dtype=torch.float)
    m = {"eval_loss": bt_loss(c, r, margin).mean().item(), "eval_accuracy": pair_accuracy(c, r),
         "eval_margin": (c - r).mean().item()}  # fmt: skip
    return m, scores.tolist()


def train(model, pairs: list[dict], held: list[dict], cfg, pad: int, log) -> tuple[dict, list]:
    """Bradley–Terry training on pairs: --epochs over global batches of --train_batch_size pairs, AdamW decayed
    linearly to 0, evaluated on held every --eval_every steps. Under torchrun every rank takes every WORLD-th pair
    of each batch and runs the same number of micro-steps (DDP and FSDP2 reduce in the backward); the loss is the
    batch's mean, so the gradient is one process's. Returns the last evaluation and the held-out scores."""
    params = [p for p in model.parameters() if p.requires_grad]
    optim = make_optimizer(model, cfg)
    fsdp = bool(fsdp_modules(model))
    net = torch.nn.parallel.DistributedDataParallel(model) if DIST and not fsdp else model
    epochs = sft_batches(len(pairs), cfg.epochs, cfg.train_batch_size, torch.Generator().manual_seed(cfg.seed))
    total = sum(map(len, epochs))
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: 1 - step / total)  # linear decay to 0
    lengths = [len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs]
    step, t0, pbar = 0, time.time(), bar(range(total), "rm")
    sums = torch.zeros(3)  # loss, accuracy (both summed over pairs) and pairs since the last evaluation

    def evaluate():
        m, scores = evaluate_pairs(model, held, cfg, pad)
        if WORLD > 1:
            torch.distributed.all_reduce(sums)
        row = {"step": step, "epoch": step / max(total, 1) * cfg.epochs, "lr": sched.get_last_lr()[0]}
        if sums[2]:
            row.update(train_loss=(sums[0] / sums[2]).item(), train_accuracy=(sums[1] / sums[2]).item())
        row.update(**m, time=time.time() - t0)
        sums.zero_()
        log(row)
        return row, scores

    last = evaluate()
    for batches in epochs:
        for batch in batches:
            model.train()
            batch = sorted(batch, key=lambda i: lengths[i])  # so every rank gets a similar share of tokens
            rows = batch[RANK::WORLD]
            steps = math.ceil(math.ceil(len(batch) / WORLD) / cfg.micro_batch_size)
            for k in range(steps):
                part, weight = rows[k * cfg.micro_batch_size : (k + 1) * cfg.micro_batch_size], 1.0
                if not part:  # a rank with fewer pairs repeats one with weight 0: every rank runs `steps` passes
                    part, weight = batch[:1], 0.0
                sync = k == steps - 1  # gradients are reduced once, after the last micro-step
                if fsdp:
                    model.set_requires_gradient_sync(sync)
                with net.no_sync() if net is not model and not sync else contextlib.nullcontext():
                    c, r = pair_forward(net, [pairs[i] for i in part], cfg.bf16, pad)
                    loss = bt_loss(c, r, torch.tensor([pairs[i]["margin"] for i in part], device=c.device))
                    (loss.sum() / len(batch) * weight * WORLD).backward()  # × WORLD: DDP averages over ranks
                sums += torch.tensor([loss.detach().sum().item(), pair_accuracy(c.detach(), r.detach()) * len(part),
                                      len(part)]) * weight  # fmt: skip
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            step += 1
            pbar.update()
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                last = evaluate()
    pbar.close()
    return last if last[0]["step"] == step else evaluate()


def train_reward_model(cfg: RMConfig) -> list[dict]:
    """Pairs, held-out pairs, the model with its score head, training, and the saved directory; returns the
    metrics rows (one per evaluation)."""
    device = pick_device(cfg.device)
    tok, context = load_tokenizer(cfg.model, cfg)
    if cfg.chat_template and not getattr(tok, "chat_template", None):
        raise SystemExit(f"--chat_template: the tokenizer of {cfg.model} has no chat template; drop --chat_template "
                         f"(texts are then --reward_template) or use a chat model")  # fmt: skip
    limit = min(cfg.max_length, context)
    pairs, fmt = load_pairs(cfg, tok, cfg.dataset_split, limit)  # every data error before the model loads
    if cfg.eval_split:
        held = load_pairs(cfg, tok, cfg.eval_split, limit)[0]
        held = held_out(held, cfg.eval_pairs, cfg.seed)[0] if cfg.eval_pairs else held
    else:
        if cfg.eval_pairs >= len(pairs):
            raise SystemExit(f"--dataset has {len(pairs)} usable pairs, too few to hold out --eval_pairs "
                             f"{cfg.eval_pairs} and train on the rest; lower it or give --eval_split")  # fmt: skip
        held, pairs = held_out(pairs, cfg.eval_pairs, cfg.seed)
    if MASTER:  # the directory holds metrics.jsonl while training; the model and rm.json arrive whole at the end
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
            write_jsonl(os.path.join(cfg.out_dir, "metrics.jsonl"), [])
        except OSError as e:
            raise SystemExit(f"--out_dir {cfg.out_dir}: not writable ({e.strerror}); choose another directory")
    barrier()
    model, tok = load_policy(cfg, device, shard=DIST, score_head=True)
    for p in model.parameters():  # LoRA's score head is stored like its bf16 base: a 5e-6 step would round away
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    pad = pad_id(tok)
    print0(f"reward model: {len(pairs)} training pairs, {len(held)} held-out, {cfg.epochs} epoch(s), lr {cfg.lr}, "
           f"batch {cfg.train_batch_size}, on {device}; out_dir {cfg.out_dir}")  # fmt: skip
    rows = []

    def log(row):
        rows.append(row)
        line = f"rm step {row['step']:>5} | epoch {row['epoch']:.2f}"
        if "train_loss" in row:
            line += f" | train loss {row['train_loss']:.4f} accuracy {row['train_accuracy']:.3f}"
        if "eval_loss" in row:
            line += f" | held-out loss {row['eval_loss']:.4f} accuracy {row['eval_accuracy']:.3f} margin " \
                    f"{row['eval_margin']:+.3f}"  # fmt: skip
        print0(line)
        if MASTER:  # the run so far; replaced by the whole directory at the end
            write_jsonl(os.path.join(cfg.out_dir, "metrics.jsonl"), rows)

    last, scores = train(model, pairs, held, cfg, pad, log)
    state = full_state_dict(model)  # FSDP2: gathered to rank 0 (every rank takes part)
    if MASTER:
        base = (os.path.abspath(cfg.model) if os.path.isdir(cfg.model) else cfg.model) if cfg.lora_r else None
        info = {"template": cfg.reward_template, "chat_template": cfg.chat_template, "base": base,
                "load_in_8bit": cfg.load_in_8bit, "prompt_format": fmt, "n_train": len(pairs), "n_eval": len(held),
                **{k: v for k, v in last.items() if k.startswith("eval_")}}  # fmt: skip
        info["config"] = dataclasses.asdict(cfg)
        held_rows = [{"row": p["row"], "prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"],
                      "score_chosen": s[0], "score_rejected": s[1]} for p, s in zip(held, scores)]  # fmt: skip
        files = {RM_FILE: json.dumps(info, indent=1), "metrics.jsonl": "".join(json.dumps(r) + "\n" for r in rows),
                 "eval_scores.jsonl": "".join(json.dumps(r) + "\n" for r in held_rows)}  # fmt: skip
        save_model_dir(cfg.out_dir, model, tok, state, files)
    release(model)
    barrier()
    acc = f"held-out accuracy {last['eval_accuracy']:.3f}, " if "eval_accuracy" in last else ""
    print0(f"reward model: {acc}saved to {cfg.out_dir} (use it with raft.py --reward {cfg.out_dir})")
    return rows


def main(argv=None):
    cfg = HfArgumentParser(RMConfig).parse_args_into_dataclasses(args=argv)[0]
    check(cfg)
    dist.quiet_libraries()
    own = dist.start(pick_device(cfg.device))
    rows = train_reward_model(cfg)
    dist.stop(own)
    return rows


if __name__ == "__main__":
    main()
    dist.exit_worker()
