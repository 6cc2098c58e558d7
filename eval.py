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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--responses", required=True, help="a .jsonl file with a `response` field per line")
    args = ap.parse_args(argv)
    with open(args.responses, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    bad = [i for i, r in enumerate(rows) if not isinstance(r.get("response"), str)]
    if bad:
        raise SystemExit(f"{args.responses}: line {bad[0] + 1} has no string field 'response'")
    print(json.dumps(text_metrics([r["response"] for r in rows]), indent=1))


if __name__ == "__main__":
    main()
