"""Measuring a policy: scoring samples, the held-out evaluation of every stage, the paper's text metrics, the
reward plot, and the paper's Table 3 for any set of models.

    python eval.py --model A --model B --dataset Dahoas/full-hh-rlhf --reward R   # Table 3 on held-out prompts
    python eval.py --responses FILE.jsonl                                        # text metrics of responses
    python eval.py --responses FILE.jsonl --pass_k 1,4                           # and pass@k, maj@n per prompt
    python eval.py --sweep runs/ablate/k                                         # an ablate.sh sweep's table

Table 3's prompts are raft.py's held-out draw (data.held_out) for the same --dataset, split, seed and --eval_prompts,
and every model samples with the same random numbers. pass@k and maj@n count a response correct when its reward is
at least 1. Definitions: docs/metrics.md. Imports raft.py's modules, never raft.py itself.
"""

import argparse
import json
import math
import os
import re
from collections import Counter
from decimal import Decimal

import torch

from data import FORMATS, dataset_response, encode_pair, held_out, load_rows, read_jsonl, resolve_format
from data import stop_strings, usable_prompts, write_jsonl
from dist import RANK, gather, pick_device, print0, shard
from models import build_example, example, load_policy, load_tokenizer, sequence_logprobs
from reward import last_number, load_rewards, score
from sampling import generate

_TOKEN = re.compile(r"\w+|[^\w\s]")
COLUMNS = [
    ("reward", "reward"), ("perplexity", "perplexity"), ("msttr_100", "MSTTR-100"), ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"), ("unique_1", "unique-1"), ("unique_2", "unique-2"), ("mean_length", "mean length"),
]  # fmt: skip


# ---- scoring samples: the reward (and the KL term) of every (prompt, response) ---------------------------------
def score_samples(tok, prompts, samples, reward_fn, kl=None) -> dict:
    """Add "reward" (NaN for NaN/inf) and, with a KL reference, "log_ratio" = log p_θ(y|x) − log p_0(y|x) to every
    sample of samples[len(prompts)][K], in place, with one reward call. Returns the reward's stats over all ranks."""
    flat_p = [p for p, row in zip(prompts, samples) for _ in row]
    flat_s = [s for row in samples for s in row]
    for s, r in zip(flat_s, score(reward_fn, flat_p, [s["text"] for s in flat_s])):
        s["reward"] = r
    if kl and flat_s:
        for s, a, b in zip(flat_s, *kl([example(tok, p, s) for p, s in zip(flat_p, flat_s)])):
            s["log_ratio"] = a - b
    parts = gather([dict(getattr(reward_fn, "stats", {}))])  # means are averaged over ranks, counts summed
    return {k: sum(p[k] for p in parts) / (len(parts) if k.endswith("_mean") else 1) for k in parts[0]}


def nanstd(x: torch.Tensor) -> float:
    x = x[~x.isnan()]
    return x.std().item() if len(x) > 1 else 0.0


def evaluate(model, tok, prompts, reward_fn, cfg, seed: int, kl=None, engine=None) -> tuple[dict, list[dict]]:
    """--eval_samples responses per held-out prompt at the sampling temperature (each rank its shard): mean reward,
    text metrics, pass@k and maj@n (--pass_k), and with a KL reference a Monte-Carlo estimate of KL(π_θ || π_0)."""
    torch.manual_seed(seed + 100_003 * RANK)
    mine = shard(prompts)
    samples = generate(model, tok, mine, cfg.eval_samples, cfg, desc="eval", engine=engine)
    stats = score_samples(tok, mine, samples, reward_fn, kl)
    rows = gather(
        [{"prompt": p, "response": s["text"], "reward": s["reward"], **({"log_ratio": s["log_ratio"]} if kl else {})}
         for p, row in zip(mine, samples) for s in row]
    )  # fmt: skip
    if not rows:  # --eval_prompts 0: nothing to measure
        return {}, rows
    rewards = torch.tensor([r["reward"] for r in rows])
    m = {"eval_reward_mean": rewards.nanmean().item(), "eval_reward_std": nanstd(rewards)}
    m.update({f"eval_{k}": v for k, v in stats.items()})  # per-reward means, reward-model truncations
    m.update({f"eval_{k}": v for k, v in text_metrics([r["response"] for r in rows]).items()})
    if cfg.pass_k:  # a response counts as correct when its reward is at least 1
        m.update({f"eval_{k}": v for k, v in pass_at_k_table(rows, [int(k) for k in cfg.pass_k.split(",")]).items()})
        m["eval_maj@n"] = maj_at_n(rows)
    if kl:
        m["eval_kl_to_start"] = sum(r.pop("log_ratio") for r in rows) / len(rows)
    return m, rows


def stage_line(m: dict) -> str:
    """The line printed after every stage."""
    s = f"stage {m['stage']:>3}"
    if "eval_reward_mean" in m:
        s += f" | eval reward {m['eval_reward_mean']:+.3f} distinct-2 {m['eval_distinct_2']:.3f}"
    if m["stage"] > 0:
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


# ---- the paper's text metrics (GEM-metrics definitions) --------------------------------------------------------
def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _ngrams(tokens, n):
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(token_lists, n: int) -> float:
    grams = [g for toks in token_lists for g in _ngrams(toks, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def unique_n(token_lists, n: int) -> int:
    counts = Counter(g for toks in token_lists for g in _ngrams(toks, n))
    return sum(1 for c in counts.values() if c == 1)


def msttr(token_lists, segment: int = 100) -> float:
    tokens = [t for toks in token_lists for t in toks]
    segments = [tokens[i : i + segment] for i in range(0, len(tokens) - segment + 1, segment)]
    return sum(len(set(s)) / segment for s in segments) / len(segments) if segments else 0.0


def text_metrics(responses: list[str]) -> dict:
    """All of the paper's diversity and length metrics for a list of responses."""
    toks = [tokenize(r) for r in responses]
    return {
        "msttr_100": msttr(toks),
        "distinct_1": distinct_n(toks, 1),
        "distinct_2": distinct_n(toks, 2),
        "unique_1": unique_n(toks, 1),
        "unique_2": unique_n(toks, 2),
        "mean_length": sum(map(len, toks)) / max(len(toks), 1),
    }


def sweep_table(root: str) -> str:
    """A markdown table of an ablation sweep (ablate.sh): runs in root/SETTING__s<seed>/metrics.jsonl. Per setting,
    mean ± std over seeds of the last stage's held-out reward, its gain over stage 0, distinct-2, KL to the start."""
    import statistics

    groups = {}
    for d in sorted(os.listdir(root)):
        path = os.path.join(root, d, "metrics.jsonl")
        if "__s" in d and os.path.exists(path):
            rows = read_jsonl(path)
            groups.setdefault(d.rsplit("__s", 1)[0], []).append(rows)

    def cell(values):
        values = [v for v in values if v is not None]
        if not values:
            return "–"
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):+.3f} ± {spread:.3f}"

    # reasoning sweeps (--pass_k) add pass@k and the entropy on the kept samples, each at the last stage
    extra = [k for k in ("eval_pass@1", "eval_pass@8", "entropy_kept") if any(k in r[-1] for g in groups.values()
                                                                             for r in g)]  # fmt: skip
    head = ["eval reward (last)", "gain over stage 0", "distinct-2 (last)", "KL to start (last)"]
    head += [f"{k.removeprefix('eval_')} (last)" for k in extra]
    lines = ["| setting | seeds | stages | " + " | ".join(head) + " |", "|---" * (len(head) + 3) + "|"]
    for name, runs in groups.items():
        last = [r[-1] for r in runs]
        cells = [
            cell([x["eval_reward_mean"] for x in last]),
            cell([r[-1]["eval_reward_mean"] - r[0]["eval_reward_mean"] for r in runs]),
            cell([x["eval_distinct_2"] for x in last]),
            cell([x.get("eval_kl_to_start") for x in last]),
        ]
        cells += [cell([x.get(k) for x in last]) for k in extra]  # fmt: skip
        lines.append(f"| {name} | {len(runs)} | {last[0]['stage']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- rule-checked answers: pass@k and majority vote ---------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k responses drawn without replacement from n, of which c are correct, is
    correct: 1 - C(n-c, k) / C(n, k), as the product 1 - Π_{i=n-c+1..n} (1 - k/i) (no huge binomials)."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise SystemExit(f"pass@{k} of {c} correct in {n} samples: need 1 <= k <= n and 0 <= c <= n; lower k or "
                         f"sample more responses per prompt")  # fmt: skip
    if n - c < k:  # every draw of k holds a correct one
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _by_prompt(rows: list[dict]) -> dict:
    """prompt -> its rows, prompts in the order they first appear."""
    groups = {}
    for r in rows:
        groups.setdefault(r["prompt"], []).append(r)
    return groups


def pass_at_k_table(rows: list[dict], ks) -> dict:
    """{"pass@k": mean over prompts of pass_at_k} for rows with `prompt` and `reward`, several per prompt; a response
    is correct when its reward is >= 1.0 (a NaN reward is not)."""
    groups = _by_prompt(rows)
    n_min = min(len(g) for g in groups.values())
    if max(ks) > n_min:
        raise SystemExit(f"--pass_k {max(ks)}: a prompt has only {n_min} responses; pass k <= {n_min} or sample more")
    out = {}
    for k in ks:
        vals = [pass_at_k(len(g), sum(r["reward"] >= 1.0 for r in g), k) for g in groups.values()]
        out[f"pass@{k}"] = sum(vals) / len(vals)
    return out


def _canonical_number(s: str) -> str:
    """One spelling per number (1,000 and 1000.0 -> 1000; 3.50 -> 3.5), so equal numbers vote together."""
    return format(Decimal(s.replace(",", "")).normalize(), "f")


def extract_answer(text: str):
    """The final answer of a response: the content of its last closed \boxed{...} (nested braces kept), else its
    last number; numbers in one canonical spelling (3.50 -> 3.5, 1,000 -> 1000); None when there is neither."""
    for start in reversed([m.end() for m in re.finditer(r"\\boxed\s*\{", text)]):
        depth = 1
        for j in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                inner = text[start:j].strip()
                number = last_number(inner)
                return _canonical_number(number) if number is not None and inner.replace(",", "") == number else inner
        # unclosed (the response was cut off): an earlier box, else the last number
    number = last_number(text)
    return None if number is None else _canonical_number(number)


def maj_at_n(rows: list[dict]):
    """Majority vote: per prompt, its responses' most common extracted answer (a tie goes to the one seen first) is
    correct when a response with that answer has reward >= 1.0. The mean over prompts with an extractable answer,
    or None if none has one."""
    correct = []
    for group in _by_prompt(rows).values():
        answers = [(extract_answer(r["response"]), r["reward"] >= 1.0) for r in group]
        votes = Counter(a for a, _ in answers if a is not None)
        if votes:
            top = max(votes, key=votes.get)  # the first of the most common, in order of first appearance
            correct.append(any(ok for a, ok in answers if a == top))
    return sum(correct) / len(correct) if correct else None


def plot_rewards(rows: list[dict], path: str):
    """What a reader looks for, per stage: the mean reward (held-out, all K samples, kept samples) beside the
    held-out distinct-2 (the paper's point: reward rises while diversity holds), and the held-out pass@k where
    --pass_k asked for it. A PNG at `path`, drawn aside and renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = sorted({k for r in rows for k in r if k.startswith("eval_pass@")}, key=lambda k: int(k.split("@")[1]))
    panels = [([("eval_reward_mean", "held-out"), ("reward_mean", "all K samples"),
                ("selected_reward_mean", "kept samples")], "mean reward"),
              ([("eval_distinct_2", "held-out")], "distinct-2")]  # fmt: skip
    if passes:
        panels.append(([(k, k[5:]) for k in passes] + [("eval_maj@n", "maj@n")], "held-out pass@k"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (series, ylabel) in zip(axes, panels):
        for key, label in series:
            pts = [(r["stage"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set(xlabel="RAFT stage", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    tmp = os.path.splitext(path)[0] + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    plt.close(fig)


def perplexity(model, tok, prompts: list[str], responses: list[str], batch_size: int = 8) -> float:
    """exp(mean NLL per token) of the responses (+ EOS) given their prompts; prompt tokens are not counted."""
    examples = [build_example(*encode_pair(tok, p, r), tok.eos_token_id) for p, r in zip(prompts, responses)]
    logp = sum(sequence_logprobs(model, examples, batch_size))
    n = sum(sum(t != -100 for t in labels[1:]) for _, labels in examples)  # the positions that are predicted
    return math.exp(-logp / n)


# ---- Table 3 ---------------------------------------------------------------------------------------------------
def markdown(rows: list[dict]) -> str:
    def cell(r, key):
        if key == "reward":
            return f"{r['reward_mean']:+.3f} ± {r['reward_std']:.3f}"
        v = r.get(key)
        return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| model | " + " | ".join(name for _, name in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {r['model']} | " + " | ".join(cell(r, key) for key, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def evaluate_models(args) -> list[dict]:
    """The table rows: one per --model, then the dataset's chosen / rejected responses."""
    if args.prompt_format not in FORMATS:
        raise SystemExit(f"--prompt_format {args.prompt_format!r}: choose one of {FORMATS}")
    device = pick_device(args.device)
    rows = load_rows(args.dataset, args.dataset_split)
    fmt = resolve_format(args.prompt_format, rows)
    args.stop = stop_strings(fmt, args.stop)
    refs = [f for f in ("chosen", "rejected") if isinstance(rows[0], dict) and f in rows[0]]
    fits = {}  # model -> {row: record} of the usable prompts, exactly as raft.py finds them
    for path in args.model:
        tok, ctx = load_tokenizer(path, args)
        fits[path] = {r["row"]: r for r in usable_prompts(args, tok, ctx, args.dataset_split, log=print0)[0]}
    first = list(fits[args.model[0]].values())
    common = [r for r in first if all(r["row"] in f for f in fits.values())]
    if len(common) < args.eval_prompts:
        raise SystemExit(
            f"--dataset {args.dataset} {args.dataset_split}: {len(common)} prompts fit every model, fewer than "
            f"--eval_prompts {args.eval_prompts}; lower it"
        )
    pick = held_out(common, args.eval_prompts, args.seed)[0]  # raft.py's held-out draw
    reward_prompts = [r["reward_prompt"] for r in pick]
    reward_fn = load_rewards(args.reward, args.reward_weights, args.reward_template, args.reward_batch_size, device,
                             args.trust_remote_code, args.offload_reward, None, args.reward_load_in_8bit,
                             {r["reward_prompt"]: r["columns"] for r in pick})  # fmt: skip
    table, samples = [], []

    def add_row(name, responses, ppl):
        rewards = torch.tensor(score(reward_fn, reward_prompts, responses))
        mean, std = rewards.nanmean().item(), nanstd(rewards)
        table.append({"model": name, "n": len(responses), "reward_mean": mean, "reward_std": std, "perplexity": ppl,
                      **text_metrics(responses), **reward_fn.stats})  # fmt: skip
        samples.extend(
            {"model": name, "row": r["row"], "prompt": p, "response": x, "reward": v}
            for r, p, x, v in zip(pick, reward_prompts, responses, rewards.tolist())
        )
        print0(f"{name}: reward {table[-1]['reward_mean']:+.3f}" + (f", perplexity {ppl:.3f}" if ppl else ""))

    for path in args.model:
        model, tok = load_policy(argparse.Namespace(**{**vars(args), "model": path}), device)
        prompts = [fits[path][r["row"]]["prompt"] for r in pick]
        torch.manual_seed(args.seed * 1000)  # raft.py's eval seed: every model draws the same random numbers
        responses = [s[0]["text"] for s in generate(model, tok, prompts, 1, args, desc=f"eval {path}")]
        ppl = None
        if "chosen" in refs:
            chosen = [dataset_response(rows[r["row"]]["chosen"], fmt, args.chat_template) for r in pick]
            ppl = perplexity(model, tok, prompts, chosen, args.micro_batch_size)
        del model  # one policy at a time
        if device.type == "cuda":
            torch.cuda.empty_cache()
        add_row(path, responses, ppl)
    for f in refs:
        add_row(f"dataset {f}", [dataset_response(rows[r["row"]][f], fmt, args.chat_template) for r in pick], None)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "table.md"), "w", encoding="utf-8") as fh:
        fh.write(markdown(table))
    settings = {k: v for k, v in vars(args).items() if k not in ("responses", "sweep")}
    with open(os.path.join(args.out_dir, "table.json"), "w", encoding="utf-8") as fh:
        json.dump({"rows": table, "settings": {**settings, "prompt_format": fmt}}, fh, indent=1)
    write_jsonl(os.path.join(args.out_dir, "samples.jsonl"), samples)
    print0("\n" + markdown(table) + f"\nwritten: {os.path.abspath(args.out_dir)}/table.md, table.json, samples.jsonl")
    return table


def reasoning_metrics(path: str, rows: list[dict], pass_k: str) -> dict:
    """--pass_k "1,4": pass@1, pass@4 and maj@n of a --responses file's rows."""
    try:
        ks = [int(k) for k in pass_k.split(",")]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise SystemExit(f"--pass_k {pass_k!r}: give comma-separated positive integers, e.g. 1,4")
    for i, r in enumerate(rows):
        if not isinstance(r.get("prompt"), str) or not isinstance(r.get("reward"), (int, float)):
            raise SystemExit(f"{path}: line {i + 1} needs a string `prompt` and a number `reward` for --pass_k")
    return {**pass_at_k_table(rows, ks), "maj@n": maj_at_n(rows)}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = ap.add_argument
    add("--responses", help="a .jsonl file with a `response` field per line: print its text metrics")
    add("--pass_k", default="", help="with --responses: also pass@k for these k (e.g. 1,4) and maj@n, from rows with "
        "`prompt` and `reward` (several per prompt; correct = reward >= 1)")  # fmt: skip
    add("--sweep", help="a directory of ablate.sh runs (SETTING__s<seed>/): print their summary table")
    add("--model", action="append", default=[], help="a causal LM (hub id or path); repeat for a row each")
    add("--dataset", help="a .jsonl/.json file or a dataset name, as raft.py's --dataset")
    add("--dataset_split", default="test", help="the split with the held-out prompts (paper: test)")
    add("--eval_prompts", type=int, default=4608, help="held-out prompts (paper: 4,608 test prompts)")
    add("--out_dir", default="runs/eval", help="where table.md, table.json and samples.jsonl go")
    add("--reward", nargs="+", action="extend", default=[], help="as raft.py's --reward")
    # the rest as raft.py's options of the same name and default (docs/options.md)
    for name, default in [
        ("prompt_field", "prompt"), ("prompt_format", "auto"), ("max_prompt_tokens", 256), ("reward_weights", ""),
        ("reward_template", "{prompt} {response}"), ("reward_batch_size", 32), ("temperature", 1.0), ("top_k", 0),
        ("top_p", 1.0), ("max_new_tokens", 128), ("gen_batch_size", 64), ("gen_backend", "fast"),
        ("micro_batch_size", 8), ("seed", 42), ("device", "auto"), ("lora_r", 0),
    ]:  # fmt: skip
        add(f"--{name}", type=type(default), default=default, help=f"as raft.py's --{name}")
    for name in ["chat_template", "offload_reward", "reward_load_in_8bit", "trust_remote_code", "bf16"]:
        add(f"--{name}", action="store_true", help=f"as raft.py's --{name}")
    add("--stop", nargs="+", action="extend", default=[], help="as raft.py's --stop")
    args = ap.parse_args(argv)
    # what sampling and loading read from raft.py's config, at the values a plain policy uses
    args.__dict__.update(cuda_graphs=True, gen_dequantized=False, load_in_8bit=False, gradient_checkpointing=False)
    return args


def main(argv=None):
    args = parse(argv)
    if args.sweep:
        print(sweep_table(args.sweep))
        return
    if args.responses:
        rows = read_jsonl(args.responses)
        bad = [i for i, r in enumerate(rows) if not isinstance(r, dict) or not isinstance(r.get("response"), str)]
        if bad:
            raise SystemExit(f"{args.responses}: line {bad[0] + 1} has no string field 'response'")
        m = text_metrics([r["response"] for r in rows])
        if args.pass_k:
            m.update(reasoning_metrics(args.responses, rows, args.pass_k))
        print(json.dumps(m, indent=1))
        return m
    if not (args.model and args.dataset and args.reward):
        raise SystemExit("eval.py: give --responses FILE, --sweep DIR, or --model (repeatable), --dataset and --reward")
    return evaluate_models(args)


if __name__ == "__main__":
    main()
