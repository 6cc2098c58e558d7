"""The evaluation command line: the paper's Table 3 for any set of models, the text metrics (and pass@k) of a file of
responses, and the table of an ablate.sh sweep. The per-stage evaluation that raft.py runs is in metrics.py.

    python eval.py --model A --model B --dataset Dahoas/full-hh-rlhf --reward R   # Table 3 on held-out prompts
    python eval.py --responses FILE.jsonl                                        # text metrics of responses
    python eval.py --responses FILE.jsonl --pass_k 1,4                           # and pass@k, maj@n per prompt
    python eval.py --sweep runs/ablate/k                                         # a sweep's table and curves

Table 3's prompts are raft.py's held-out draw (data.held_out) for the same --dataset, split, seed and --eval_prompts,
and every model samples with the same random numbers. pass@k and maj@n count a response correct when its reward is
at least 1. Definitions: docs/metrics.md. Imports raft.py's modules, never raft.py itself.
"""

import argparse
import json
import math
import os

import torch

from data import FORMATS, dataset_response, encode_pair, held_out, load_rows, read_jsonl, resolve_format
from data import stop_strings, usable_prompts, write_jsonl
from checks import check_rewards, check_sampling, need
from dist import pick_device, print0, quiet_libraries
from metrics import maj_at_n, nanstd, pass_at_k_table, pass_ks, text_metrics
from models import build_example, load_policy, load_tokenizer, sequence_logprobs
from reward import TEMPLATE, load_rewards, score
from sampling import generate

COLUMNS = [
    ("reward", "reward"), ("perplexity", "perplexity"), ("msttr_100", "MSTTR-100"), ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"), ("unique_1", "unique-1"), ("unique_2", "unique-2"), ("mean_length", "mean length"),
]  # fmt: skip


# ---- an ablation sweep's table and curves ---------------------------------------------------------------------------
def sweep_runs(root: str) -> dict:
    """setting -> [metrics rows of each seed's run], from root/SETTING__s<seed>/metrics.jsonl (ablate.sh's layout)."""
    groups = {}
    for d in sorted(os.listdir(root)):
        path = os.path.join(root, d, "metrics.jsonl")
        if "__s" in d and os.path.exists(path):
            groups.setdefault(d.rsplit("__s", 1)[0], []).append(read_jsonl(path))
    return groups


def sweep_table(root: str) -> str:
    """A markdown table of an ablation sweep (ablate.sh): runs in root/SETTING__s<seed>/metrics.jsonl. Per setting,
    mean ± std over seeds of the last stage's held-out reward, its gain over stage 0, distinct-2, KL to the start."""
    import statistics

    groups = sweep_runs(root)

    def cell(values):
        values = [v for v in values if v is not None]
        if not values:
            return "–"
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):+.3f} ± {spread:.3f}"

    # reasoning sweeps (--pass_k) add pass@k, the policy's entropy and its low-variance KL, each at the last stage
    extra = [k for k in ("eval_pass@1", "eval_pass@8", "entropy", "entropy_kept", "kl_low_var")
             if any(k in r[-1] for g in groups.values() for r in g)]  # fmt: skip
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


SWEEP_CURVES = [("eval_pass@1", "held-out pass@1"), ("eval_pass@8", "held-out pass@8"),
                ("entropy", "entropy (nats/token)"), ("kl_low_var", "KL to stage 0 (low-variance)"),
                ("eval_reward_mean", "held-out reward")]  # fmt: skip


def sweep_plot(root: str, path: str):
    """Per stage, each setting's mean over seeds (a line) and its spread (a band of ± one std), one panel per metric
    of SWEEP_CURVES that the runs logged (the reward only where pass@1 is absent): a PNG at path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sweep_runs(root)
    rows = [r for runs in groups.values() for rs in runs for r in rs]
    keys = [(k, t) for k, t in SWEEP_CURVES if any(r.get(k) is not None for r in rows)]
    keys = [(k, t) for k, t in keys if k != "eval_reward_mean" or len(keys) == 1]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], keys):
        for name, runs in groups.items():
            stages = sorted({r["stage"] for rs in runs for r in rs if r.get(key) is not None})
            vals = [[r[key] for rs in runs for r in rs if r["stage"] == t and r.get(key) is not None] for t in stages]
            mean = torch.tensor([sum(v) / len(v) for v in vals])
            std = torch.tensor([torch.tensor(v).std().item() if len(v) > 1 else 0.0 for v in vals])
            ax.plot(stages, mean, label=name)
            ax.fill_between(stages, mean - std, mean + std, alpha=0.2)
        ax.set(xlabel="stage", title=title)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=min(len(groups), 9), fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))  # room for the legend under the panels
    fig.savefig(path, dpi=80)
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
    reward_fn = load_rewards(args.reward, args.reward_weights, None, {r["reward_prompt"]: r["columns"] for r in pick},
                             template=args.reward_template, batch_size=args.reward_batch_size, device=device,
                             trust_remote_code=args.trust_remote_code, offload=args.offload_reward,
                             load_in_8bit=args.reward_load_in_8bit)  # fmt: skip
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
    ks = pass_ks(pass_k)
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
    add("--sweep", help="a directory of ablate.sh runs (SETTING__s<seed>/): print their summary table, draw sweep.png")
    add("--model", action="append", default=[], help="a causal LM (hub id or path); repeat for a row each")
    add("--dataset", help="a .jsonl/.json file or a dataset name, as raft.py's --dataset")
    add("--dataset_split", default="test", help="the split with the held-out prompts (paper: test)")
    add("--eval_prompts", type=int, default=4608, help="held-out prompts (paper: 4,608 test prompts)")
    add("--out_dir", default="runs/eval", help="where table.md, table.json and samples.jsonl go")
    add("--reward", nargs="+", action="extend", default=[], help="as raft.py's --reward")
    # the rest as raft.py's options of the same name and default (docs/options.md)
    for name, default in [
        ("prompt_field", "prompt"), ("prompt_format", "auto"), ("max_prompt_tokens", 256), ("reward_weights", ""),
        ("reward_template", TEMPLATE), ("reward_batch_size", 32), ("temperature", 1.0), ("top_k", 0),
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
        sweep_plot(args.sweep, os.path.join(args.sweep, "sweep.png"))
        print0(f"curves: {os.path.join(args.sweep, 'sweep.png')}")
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
    check_sampling(args)  # as raft.py's, before any model loads
    check_rewards(args)
    need(args.eval_prompts >= 1 and args.micro_batch_size >= 1, "--eval_prompts and --micro_batch_size must be ≥ 1")
    need(not args.pass_k, "--pass_k reads a --responses file (one model's several samples per prompt); the table "
         "samples one response per prompt")  # fmt: skip
    need(args.lora_r == 0, "--lora_r: eval.py loads a LoRA stage directory as saved (its adapter_config.json names "
         "the base); drop --lora_r")  # fmt: skip
    need(args.prompt_format in FORMATS, f"--prompt_format {args.prompt_format!r}: choose one of {FORMATS}")
    quiet_libraries()  # e.g. bitsandbytes' line per int8 matmul under --reward_load_in_8bit
    return evaluate_models(args)


if __name__ == "__main__":
    main()
