"""The paper's Table 3 for any set of models, and the text metrics it reports (GEM-metrics definitions).

    python eval.py --model A --model B ... --dataset Dahoas/full-hh-rlhf --reward R   # the table
    python eval.py --responses FILE.jsonl   # text metrics of a `response` field per line, as JSON (no model)

The table has one row per --model and, when the rows carry them, reference rows for the dataset's own `chosen` and
`rejected` responses (as in the paper), all on the same held-out prompts:
- reward: mean ± std of the reward of one sampled response per prompt. The prompts are --eval_prompts of
  --dataset_split (default: 4,608 of the test split, as the paper; a .jsonl file is one split), those that fit
  every model (--max_prompt_tokens and the context), picked with --seed exactly as raft.py picks its per-stage
  held-out prompts; every model samples with the same random numbers. On the same prompts and settings, a RAFT
  stage's model gets the stage's `eval_reward_mean` again.
- perplexity: exp of the mean negative log-likelihood per token of the held-out `chosen` responses given their
  prompts (the paper: perplexity on chosen responses), each response's tokens plus EOS (it ends there), in each
  model's own tokenisation. Reference rows have none.
- MSTTR-100, distinct-1/2, unique-1/2, mean length of the responses, as defined below.
It prints the markdown table and writes to --out_dir `table.md`, `table.json` (rows and settings) and
`samples.jsonl` (every response with its reward); those three files are replaced on a new run.

Tokenisation of the text metrics: each response is lower-cased and split into words and single punctuation marks
with the regex `\\w+|[^\\w\\s]` ("It's great!" -> it ' s great !). n-grams never cross from one response into the next.
- distinct-n: distinct n-grams / all n-grams, over all responses.
- unique-n: the number of n-grams that occur exactly once over all responses (a count, as in the paper).
- MSTTR-100: the tokens of all responses in order, cut into consecutive 100-token segments (a shorter last
  segment is dropped); the mean over segments of (distinct tokens / 100); 0 with fewer than 100 tokens.
- mean_length: mean number of tokens per response.

raft.py calls `text_metrics` for its per-stage evaluation, and data.py's `write_metrics` calls `plot_rewards` for
reward_curve.png; this file reuses raft.py's generation, encoding and log-likelihood functions and data.py's loading
(imported inside functions: raft.py and data.py import this module).
    python eval.py --sweep runs/ablate/k       # the summary table of an ablate.sh sweep (mean ± std over seeds)
"""

import argparse
import dataclasses
import json
import math
import os
import re
from collections import Counter

_TOKEN = re.compile(r"\w+|[^\w\s]")
# Options shared with raft.py: same names, defaults and help text (raft.Config)
SHARED = [
    "dataset",
    "prompt_field",
    "prompt_format",
    "chat_template",
    "eval_prompts",
    "max_prompt_tokens",
    "reward",
    "reward_weights",
    "reward_template",
    "reward_batch_size",
    "offload_reward",
    "reward_load_in_8bit",
    "temperature",
    "top_k",
    "top_p",
    "max_new_tokens",
    "stop",
    "gen_batch_size",
    "micro_batch_size",
    "seed",
    "device",
    "trust_remote_code",
]
HELP = {"eval_prompts": "held-out prompts of --dataset_split to evaluate on (paper: 4,608 test prompts)"}
COLUMNS = [
    ("reward", "reward"),
    ("perplexity", "perplexity"),
    ("msttr_100", "MSTTR-100"),
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
    ("unique_1", "unique-1"),
    ("unique_2", "unique-2"),
    ("mean_length", "mean length"),
]


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
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            groups.setdefault(d.rsplit("__s", 1)[0], []).append(rows)

    def cell(values):
        values = [v for v in values if v is not None]
        if not values:
            return "–"
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):+.3f} ± {spread:.3f}"

    lines = [
        "| setting | seeds | stages | eval reward (last) | gain over stage 0 | distinct-2 (last) | KL to start (last) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in groups.items():
        last = [r[-1] for r in runs]
        lines.append(
            f"| {name} | {len(runs)} | {last[0]['iteration']} | {cell([x['eval_reward_mean'] for x in last])} "
            f"| {cell([r[-1]['eval_reward_mean'] - r[0]['eval_reward_mean'] for r in runs])} "
            f"| {cell([x['eval_distinct_2'] for x in last])} "
            f"| {cell([x.get('eval_kl_to_start') for x in last])} |"
        )
    return "\n".join(lines)


def plot_rewards(rows: list[dict], path: str):
    """The mean reward per stage of metrics rows (held-out, all K samples, kept samples) as a PNG at `path`, drawn
    aside and renamed, as the run directory's other files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in [
        ("eval_reward_mean", "held-out (eval)"),
        ("reward_mean", "all K samples"),
        ("selected_reward_mean", "kept samples"),
    ]:
        pts = [(r["iteration"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.set(xlabel="RAFT stage", ylabel="mean reward", title="RAFT reward per stage")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = os.path.splitext(path)[0] + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    plt.close(fig)


def perplexity(model, tok, prompts: list[str], responses: list[str], batch_size: int = 8) -> float:
    """exp(mean NLL per token) of the responses (+ EOS) given their prompts; prompt tokens are not counted."""
    from raft import build_example, encode_pair, sequence_logprobs

    examples = [build_example(*encode_pair(tok, p, r), tok.eos_token_id) for p, r in zip(prompts, responses)]
    logp = sum(sequence_logprobs(model, examples, batch_size))
    n = sum(sum(t != -100 for t in labels[1:]) for _, labels in examples)  # the positions that are predicted
    return math.exp(-logp / n)


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
    import torch
    from transformers import AutoConfig, AutoTokenizer

    import raft
    from data import FORMATS, dataset_response, format_prompts, load_rows, resolve_format, stop_strings, write_jsonl
    from reward import load_rewards, score

    if args.prompt_format not in FORMATS:
        raise SystemExit(f"--prompt_format {args.prompt_format!r}: choose one of {FORMATS}")
    cfg = raft.Config(**{k: getattr(args, k) for k in SHARED})
    device = raft.pick_device(cfg)
    rows = load_rows(args.dataset, args.dataset_split)
    fmt = resolve_format(args.prompt_format, rows)
    cfg.stop = stop_strings(fmt, cfg.stop)
    refs = [f for f in ("chosen", "rejected") if isinstance(rows[0], dict) and f in rows[0]]
    fits = {}  # model -> {row: record} of the prompts that fit it
    for path in args.model:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
        ctx = getattr(
            AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code),
            "max_position_embeddings",
            1 << 30,
        )
        limit = min(args.max_prompt_tokens, ctx - args.max_new_tokens)
        records = format_prompts(rows, args.prompt_field, args.prompt_format, tok, args.chat_template)[0]
        fits[path] = {r["row"]: r for r in records if len(raft.encode_prompt(tok, r["prompt"])) <= limit}
    common = sorted(set.intersection(*(set(f) for f in fits.values())))
    if len(common) < args.eval_prompts:
        raise SystemExit(
            f"--dataset {args.dataset} {args.dataset_split}: {len(common)} prompts fit every model, "
            f"fewer than --eval_prompts {args.eval_prompts}; lower it"
        )
    pick = [
        common[i]
        for i in torch.randperm(len(common), generator=torch.Generator().manual_seed(args.seed)).tolist()[
            : args.eval_prompts
        ]
    ]  # the same draw as raft.py's held-out prompts
    reward_prompts = [fits[args.model[0]][i]["reward_prompt"] for i in pick]
    reward_fn = load_rewards(
        args.reward,
        args.reward_weights,
        args.reward_template,
        args.reward_batch_size,
        device,
        args.trust_remote_code,
        args.offload_reward,
        None,
        args.reward_load_in_8bit,
    )
    table, samples = [], []

    def add_row(name, responses, ppl):
        rewards = torch.tensor(score(reward_fn, reward_prompts, responses))
        table.append(
            {
                "model": name,
                "n": len(responses),
                "reward_mean": rewards.nanmean().item(),
                "reward_std": raft._nanstd(rewards),
                "perplexity": ppl,
                **text_metrics(responses),
                **reward_fn.stats,
            }
        )
        samples.extend(
            {"model": name, "row": i, "prompt": p, "response": r, "reward": v}
            for i, p, r, v in zip(pick, reward_prompts, responses, rewards.tolist())
        )
        raft.print0(f"{name}: reward {table[-1]['reward_mean']:+.3f}" + (f", perplexity {ppl:.3f}" if ppl else ""))

    for path in args.model:
        model, tok = raft.load_policy(dataclasses.replace(cfg, model=path), device)
        prompts = [fits[path][i]["prompt"] for i in pick]
        torch.manual_seed(cfg.seed * 1000)  # raft.py's eval seed: every model draws the same random numbers
        responses = [s[0]["text"] for s in raft.generate(model, tok, prompts, 1, cfg, desc=f"eval {path}")]
        ppl = None
        if "chosen" in refs:
            chosen = [dataset_response(rows[i]["chosen"], fmt, args.chat_template) for i in pick]
            ppl = perplexity(model, tok, prompts, chosen, cfg.micro_batch_size)
        del model  # one policy at a time
        if device.type == "cuda":
            torch.cuda.empty_cache()
        add_row(path, responses, ppl)
    for f in refs:
        add_row(f"dataset {f}", [dataset_response(rows[i][f], fmt, args.chat_template) for i in pick], None)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "table.md"), "w", encoding="utf-8") as fh:
        fh.write(markdown(table))
    settings = {k: getattr(args, k) for k in ["model", "dataset", "dataset_split", *SHARED]}
    with open(os.path.join(args.out_dir, "table.json"), "w", encoding="utf-8") as fh:
        json.dump({"rows": table, "settings": {**settings, "prompt_format": fmt, "stop": cfg.stop}}, fh, indent=1)
    write_jsonl(os.path.join(args.out_dir, "samples.jsonl"), samples)
    raft.print0(
        "\n" + markdown(table) + f"\nwritten: {os.path.abspath(args.out_dir)}/table.md, table.json, samples.jsonl"
    )
    return table


def main(argv=None):
    from raft import Config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--responses", help="a .jsonl file with a `response` field per line: print its text metrics")
    ap.add_argument("--sweep", help="a directory of ablate.sh runs (SETTING__s<seed>/): print their summary table")
    ap.add_argument("--model", action="append", default=[], help="a causal LM (hub id or path); repeat for a row each")
    ap.add_argument("--dataset_split", default="test", help="split with the held-out prompts (paper: test)")
    ap.add_argument("--out_dir", default="runs/eval", help="where table.md, table.json and samples.jsonl go")
    for f in dataclasses.fields(Config):
        if f.name in SHARED:  # raft.py's option: same name, default and help
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            kw = (
                {"action": "store_true"}
                if isinstance(default, bool)
                else {"nargs": "+", "action": "extend", "default": []}
                if isinstance(default, list)
                else {"type": type(default) if default is not None else str, "default": default}
            )
            ap.add_argument(f"--{f.name}", help=HELP.get(f.name, f.metadata["help"]), **kw)
    args = ap.parse_args(argv)
    if args.sweep:
        print(sweep_table(args.sweep))
        return
    if args.responses:
        with open(args.responses, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        bad = [i for i, r in enumerate(rows) if not isinstance(r.get("response"), str)]
        if bad:
            raise SystemExit(f"{args.responses}: line {bad[0] + 1} has no string field 'response'")
        m = text_metrics([r["response"] for r in rows])
        print(json.dumps(m, indent=1))
        return m
    if not (args.model and args.dataset and args.reward):
        raise SystemExit("eval.py: give --responses FILE, --sweep DIR, or --model (repeatable), --dataset and --reward")
    return evaluate_models(args)


if __name__ == "__main__":
    main()
