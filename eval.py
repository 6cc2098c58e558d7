"""Metrics of generated text, as in the paper's Table 3 (GEM-metrics definitions).

Tokenisation: each response is lower-cased and split into words and single punctuation marks with the regex
`\\w+|[^\\w\\s]` ("It's great!" -> it ' s great !). n-grams never cross from one response into the next.
- distinct-n: distinct n-grams / all n-grams, over all responses.
- unique-n: the number of n-grams that occur exactly once over all responses (a count, as in the paper).
- MSTTR-100: the tokens of all responses in order, cut into consecutive 100-token segments (a shorter last
  segment is dropped); the mean over segments of (distinct tokens / 100).
- mean_length: mean number of tokens per response.

raft.py calls `text_metrics` for its per-stage evaluation. As a script:
    python eval.py --responses FILE.jsonl      # a `response` field per line -> prints the metrics as JSON
    python eval.py --sweep runs/ablate/k       # the summary table of an ablate.sh sweep (mean ± std over seeds)
"""
import argparse
import json
import re
from collections import Counter

_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _ngrams(tokens, n):
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(token_lists, n: int) -> float:
    grams = [g for toks in token_lists for g in _ngrams(toks, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def unique_n(token_lists, n: int) -> int:
    counts = Counter(g for toks in token_lists for g in _ngrams(toks, n))
    return sum(1 for c in counts.values() if c == 1)


def msttr(token_lists, segment: int = 100) -> float:
    tokens = [t for toks in token_lists for t in toks]
    segments = [tokens[i:i + segment] for i in range(0, len(tokens) - segment + 1, segment)]
    return sum(len(set(s)) / segment for s in segments) / len(segments) if segments else 0.0


def text_metrics(responses: list[str]) -> dict:
    """All of the paper's diversity and length metrics for a list of responses."""
    toks = [tokenize(r) for r in responses]
    return {"msttr_100": msttr(toks), "distinct_1": distinct_n(toks, 1), "distinct_2": distinct_n(toks, 2),
            "unique_1": unique_n(toks, 1), "unique_2": unique_n(toks, 2),
            "mean_length": sum(map(len, toks)) / max(len(toks), 1)}


def sweep_table(root: str) -> str:
    """A markdown table of an ablation sweep (ablate.sh): runs in root/SETTING__s<seed>/metrics.jsonl. Per setting,
    mean ± std over seeds of the last stage's held-out reward, its gain over stage 0, distinct-2, KL to the start."""
    import os
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
    lines = ["| setting | seeds | stages | eval reward (last) | gain over stage 0 | distinct-2 (last) | KL to start (last) |",
             "|---|---|---|---|---|---|---|"]
    for name, runs in groups.items():
        last = [r[-1] for r in runs]
        lines.append(f"| {name} | {len(runs)} | {last[0]['iteration']} | {cell([x['eval_reward_mean'] for x in last])} "
                     f"| {cell([r[-1]['eval_reward_mean'] - r[0]['eval_reward_mean'] for r in runs])} "
                     f"| {cell([x['eval_distinct_2'] for x in last])} "
                     f"| {cell([x.get('eval_kl_to_start') for x in last])} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--responses", help="a .jsonl file with a `response` field per line")
    ap.add_argument("--sweep", help="a directory of ablate.sh runs (SETTING__s<seed>/): print their summary table")
    args = ap.parse_args(argv)
    if args.sweep:
        print(sweep_table(args.sweep))
        return
    if not args.responses:
        ap.error("give --responses FILE.jsonl or --sweep DIR")
    with open(args.responses, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    bad = [i for i, r in enumerate(rows) if not isinstance(r.get("response"), str)]
    if bad:
        raise SystemExit(f"{args.responses}: line {bad[0] + 1} has no string field 'response'")
    print(json.dumps(text_metrics([r["response"] for r in rows]), indent=1))


if __name__ == "__main__":
    main()
