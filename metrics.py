"""What the loop measures: the reward (and the KL term) of every sample, the held-out evaluation of every stage, the
paper's text metrics, pass@k and maj@n for rule-checked rewards, the line printed after a stage and the reward plot.
Definitions: docs/metrics.md and docs/reasoning.md. The evaluation command line (Table 3, sweep tables) is eval.py;
this file leaves it out so that a copy of raft.py does without it.
"""

import math
import os
import re
from collections import Counter
from decimal import Decimal

import torch

from dist import RANK, gather, shard
from losses import single_step
from models import dropout_free, example, policy_pass
from reward import last_number, score
from sampling import generate

_TOKEN = re.compile(r"\w+|[^\w\s]")


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


def measure_policy(model, tok, prompts, samples, kept, cfg, kl, m: dict):
    """The policy that sampled samples[b][K], before any update: adds to m its mean per-token entropy on the kept
    samples (entropy_kept), under --regime rl also on every sample (entropy), and with a KL reference the low-variance
    KL to stage 0 (kl_low_var), all at the sampling temperature. The paper's regime measures the kept samples only, the
    RL regime all (as verl). Returns (π_old, finish): the kept samples' per-token log-probs for --loss is and clip, and
    None. Fused, when the update is one dropout-free step over every kept sample from these weights and no KL is
    measured: this pass skips the kept samples, π_old is None (the update takes its own log-probs, as TRL and verl
    do then) and the update's forward hands their (entropy, tokens) sums to finish, which completes the metrics."""
    fused = single_step(cfg, len(kept)) and kl is None and dropout_free(model, cfg)
    every = [(i, j) for i in range(len(prompts)) for j in range(len(samples[i]))]
    pairs, trained = every if cfg.regime == "rl" else [k[:2] for k in kept], {k[:2] for k in kept}
    if fused:  # the update's forward measures the samples it trains on; this pass, only the others
        pairs = [p for p in pairs if p not in trained]
    examples = [example(tok, prompts[i], samples[i][j]) for i, j in pairs]
    lps, per = policy_pass(model, examples, cfg.micro_batch_size, cfg.bf16, cfg.temperature or 1.0,
                           kl.reference if kl else None) if pairs else ([], [])  # fmt: skip
    at = {p: k for k, p in enumerate(pairs)}
    mine = [at[i, j] for i, j, _ in kept if (i, j) in at]
    total = lambda ks: torch.tensor([sum(per[k][c] for k in ks) for c in range(3)], dtype=torch.float64)
    kept_sums, all_sums = total(mine), total(range(len(pairs)))  # entropy, tokens, KL summed over tokens

    def finish(entropy=0.0, tokens=0):  # the update's sums over the kept samples' tokens (fused)
        k, a = kept_sums + torch.tensor([entropy, tokens, 0.0]), all_sums + torch.tensor([entropy, tokens, 0.0])
        if kept:
            m["entropy_kept"] = (k[0] / k[1].clamp(min=1)).item()
        if cfg.regime == "rl":
            m["entropy"] = (a[0] / a[1].clamp(min=1)).item()
        if kl:
            m["kl_low_var"] = (a[2] / a[1].clamp(min=1)).item()

    if fused:
        return None, finish
    finish()
    return ([lps[k] for k in mine] if cfg.loss != "sft" and mine else None), None


def nanstd(x: torch.Tensor) -> float:
    x = x[~x.isnan()]
    return x.std().item() if len(x) > 1 else 0.0


def evaluate(model, tok, prompts, reward_fn, cfg, seed: int, kl=None, engine=None) -> tuple[dict, list[dict]]:
    """--eval_samples responses per held-out prompt at the sampling temperature (each rank its shard): mean reward,
    text metrics, pass@k and maj@n (--pass_k), and with a KL reference a Monte-Carlo estimate of KL(π_θ || π_0).
    The policy is what is measured: a vLLM engine that holds a --generator_model is not used."""
    torch.manual_seed(seed + 100_003 * RANK)
    if engine is not None and engine["generator"]:
        engine = None
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
        m.update({f"eval_{k}": v for k, v in pass_at_k_table(rows, pass_ks(cfg.pass_k)).items()})
        m["eval_maj@n"] = maj_at_n(rows)
    if kl:
        m["eval_kl_to_start"] = sum(r.pop("log_ratio") for r in rows) / len(rows)
    return m, rows


def stage_line(m: dict) -> str:
    """The line printed after every stage."""
    s = f"stage {m['stage']:>3}"
    if "eval_reward_mean" in m:
        s += f" | eval reward {m['eval_reward_mean']:+.3f} distinct-2 {m['eval_distinct_2']:.3f}"
    # several --reward: each one's own held-out mean (a reward of weight 0 is watched, not optimised)
    parts = sorted((int(k.split("_")[2]), v) for k, v in m.items() if re.fullmatch(r"eval_reward_\d+_mean", k))
    if parts:
        s += " (per reward " + " ".join(f"{v:+.3f}" for _, v in parts) + ")"
    if "eval_kl_to_start" in m:
        s += f" KL {m['eval_kl_to_start']:.2f}"
    if "entropy" in m:  # --regime rl: the policy's entropy on its samples, where collapse shows
        s += f" | entropy {m['entropy']:.3f}"
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


# ---- rule-checked answers: pass@k and majority vote ---------------------------------------------------------
def pass_ks(text: str) -> list[int]:
    """--pass_k "1,8" -> [1, 8], "" -> []; anything but comma-separated positive integers is a one-line error."""
    if not text:
        return []
    if not re.fullmatch(r"\d+(,\d+)*", text) or min(int(k) for k in text.split(",")) < 1:
        raise SystemExit(f"--pass_k {text!r}: give comma-separated positive integers, e.g. 1,8")
    return [int(k) for k in text.split(",")]


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


_LATEX_NOISE = re.compile(r"\\left|\\right|\\[,;:! ]|\s|\$|\.$")  # sizing, spacing, math mode, a final period


def _canonical_latex(s: str) -> str:
    r"""One spelling per written form: \dfrac and \tfrac as \frac, \left/\right, spaces, $ and a final period
    gone (\dfrac{1}{2} and \frac {1}{2} vote together; \frac12 and 0.5 do not: that needs algebra)."""
    return _LATEX_NOISE.sub("", s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac"))


def extract_answer(text: str):
    r"""The final answer of a response: the content of its last closed \boxed{...} (nested braces kept), else its
    last number; numbers in one canonical spelling (3.50 -> 3.5, 1,000 -> 1000), LaTeX as _canonical_latex writes
    it; None when there is neither."""
    for start in reversed([m.end() for m in re.finditer(r"\\boxed\s*\{", text)]):
        depth = 1
        for j in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                inner = text[start:j].strip()
                number = last_number(inner)
                return (
                    _canonical_number(number)
                    if number is not None and inner.replace(",", "") == number
                    else (_canonical_latex(inner))
                )
        # unclosed (the response was cut off): an earlier box, else the last number
    number = last_number(text)
    return None if number is None else _canonical_number(number)


def maj_at_n(rows: list[dict]) -> float:
    """Majority vote: per prompt, its responses' most common extracted answer (a tie goes to the one seen first) is
    correct when a response with that answer has reward >= 1.0. The mean over all prompts: a prompt none of whose
    responses has an answer counts as wrong."""
    correct = []
    for group in _by_prompt(rows).values():
        answers = [(extract_answer(r["response"]), r["reward"] >= 1.0) for r in group]
        votes = Counter(a for a, _ in answers if a is not None)
        top = max(votes, key=votes.get) if votes else None  # the first of the most common, in order of appearance
        correct.append(top is not None and any(ok for a, ok in answers if a == top))
    return sum(correct) / len(correct)


# ---- the reward plot ----------------------------------------------------------------------------------------------
def plot_rewards(rows: list[dict], path: str):
    """What a reader looks for, per stage: the mean reward (held-out, all K samples, kept samples) beside the
    held-out distinct-2 (the paper's point: reward rises while diversity holds), the held-out pass@k where --pass_k
    asked for it, and the policy's entropy and KL to stage 0 where measured. A PNG at `path`, drawn aside and
    renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = sorted({k for r in rows for k in r if k.startswith("eval_pass@")}, key=lambda k: int(k.split("@")[1]))
    panels = [([("eval_reward_mean", "held-out"), ("reward_mean", "all K samples"),
                ("selected_reward_mean", "kept samples")], "mean reward"),
              ([("eval_distinct_2", "held-out")], "distinct-2")]  # fmt: skip
    if passes:
        panels.append(([(k, k[5:]) for k in passes] + [("eval_maj@n", "maj@n")], "held-out pass@k"))
    if any(k in r for r in rows for k in ("entropy", "kl_low_var")):  # the policy's collapse and drift per stage
        panels.append(([("entropy", "entropy, all samples"), ("entropy_kept", "entropy, kept samples"),
                        ("kl_low_var", "KL to stage 0 (low-variance)")], "nats per token"))  # fmt: skip
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
