"""What each kept sample weighs and how its tokens enter the fine-tuning loss: the paper's SFT on the kept set, and
the family of Xiong et al. 2025 ("A Minimalist Approach to LLM Reasoning") built on the same selection.

- `advantages`: one number per kept sample. one: 1 (the paper: SFT on the kept set); correct: 1 if its reward is at
  least --keep_threshold, else 0 (RAFT on a 0/1 reward); reinforce: +1 or -1 by the same test; grpo: (r - mean) /
  (std + 1e-6) over the prompt's valid samples. Prompts whose valid samples are all correct, or all wrong, can be
  dropped for any of them (Reinforce-Rej drops both).
- `token_objective`: sft: A·log π_θ; is: A·π_θ/π_old, the importance ratio to the policy that sampled, unclipped;
  clip: PPO's min(ratio·A, clip(ratio, 1 - ε, 1 + ε_high)·A), whose gradient is 0 where the clip holds.
- `rl_batches` and `sft_batches`: the optimizer steps of a stage in --regime rl (mini-batches of prompts) and raft
  (the paper: epochs of shuffled global batches); `single_step`: whether there is only one. How a step averages its
  tokens (--loss_agg) is raft.finetune's.
Definitions and the options that name them: docs/reasoning.md. Imports no kit module.
"""

import math

import torch

ADVANTAGES = ("one", "correct", "reinforce", "grpo")
LOSSES = ("sft", "is", "clip")
AGGREGATIONS = ("token", "sequence")


def advantages(rewards, valid, keep, mode: str, threshold: float, drop_all_correct=False, drop_all_wrong=False):
    """From rewards and valid [b, K] and the kept (prompt, sample) pairs: the pairs left after the drops, each with
    its advantage, [(i, j, A)]; and [b] masks of the prompts whose valid samples are all correct and none correct."""
    correct = valid & (rewards >= threshold)
    n_valid = valid.sum(1)
    all_correct = (correct.sum(1) == n_valid) & (n_valid > 0)
    none_correct = ~correct.any(1)
    dropped = (all_correct & drop_all_correct) | (none_correct & drop_all_wrong)
    if mode == "grpo":  # over the prompt's valid samples, as verl's GRPO: unbiased std, 0 for a single sample
        r = rewards.masked_fill(~valid, 0.0)
        mean = r.sum(1) / n_valid.clamp(min=1)
        var = ((r - mean[:, None]) ** 2 * valid).sum(1) / (n_valid - 1).clamp(min=1)
        adv = torch.where(valid, (rewards - mean[:, None]) / (var.sqrt()[:, None] + 1e-6), 0.0)
    elif mode == "one":
        adv = torch.ones_like(rewards)
    elif mode == "correct":
        adv = correct.float()
    else:  # reinforce
        adv = correct.float() * 2 - 1
    out = [(i, j, float(adv[i, j])) for i, j in keep if not dropped[i]]
    return out, all_correct, none_correct


def token_objective(lp, old, adv, loss: str, eps: float, eps_high: float):
    """Per token: the objective to maximise, and where the clip holds (clip only; else all False)."""
    if loss == "sft":
        return adv * lp, torch.zeros_like(lp, dtype=torch.bool)
    ratio = (lp - old).exp()
    if loss == "is":
        return ratio * adv, torch.zeros_like(lp, dtype=torch.bool)
    plain, clipped = ratio * adv, ratio.clamp(1 - eps, 1 + eps_high) * adv
    return torch.minimum(plain, clipped), clipped < plain


def rl_batches(prompt_of: list[int], n_prompts: int, mini_batches: int, gen) -> list[list[int]]:
    """The RL regime's optimizer steps: the stage's prompts in a seeded order, split into mini_batches groups of
    prompts; each step takes every kept sample of its group's prompts (a group with none takes no step)."""
    order = torch.randperm(n_prompts, generator=gen).tolist()
    size = math.ceil(n_prompts / mini_batches)
    group = {p: k // size for k, p in enumerate(order)}
    steps = [[] for _ in range(math.ceil(n_prompts / size))]
    for i, p in enumerate(prompt_of):
        steps[group[p]].append(i)
    return [s for s in steps if s]


def sft_batches(n: int, epochs: int, batch_size: int, gen) -> list[list[list[int]]]:
    """The paper's regime, per epoch: a fresh permutation of the n kept samples, cut into global batches."""
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).tolist()
        out.append([perm[s : s + batch_size] for s in range(0, n, batch_size)])
    return out


def single_step(cfg, n_kept: int) -> bool:
    """Whether a stage's update is one optimizer step over all its n_kept samples, from the weights that sampled
    them: then π_old is that step's own log-probabilities (the ratio is exactly 1), as in TRL and verl."""
    if cfg.finetune_from != "current":  # the weights are reset to stage 0 between sampling and the update
        return False
    return cfg.mini_batches == 1 if cfg.regime == "rl" else cfg.epochs == 1 and n_kept <= cfg.train_batch_size


def binary(cfg) -> bool:
    """Whether a run (raft.Config) reads rewards as correct or wrong by --keep_threshold: then it logs the shares of
    prompts with all and with none of their samples correct."""
    return bool(cfg.pass_k or cfg.ranking == "positive" or cfg.advantage in ("correct", "reinforce")
                or cfg.drop_all_correct or cfg.drop_all_wrong)  # fmt: skip
