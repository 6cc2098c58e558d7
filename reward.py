"""Rewards for RAFT: r(prompt, response) -> float, batched.

`load_reward(spec)` accepts
- `path/to/file.py:function` or `module:function`: a Python callable `f(prompts: list[str], responses: list[str])
  -> list[float]` (TRL's reward-function convention). Note: a file path is *executed* as Python code.
- anything else: the hub id or local path of an `AutoModelForSequenceClassification` reward model with one output
  (e.g. the paper's `weqweasdas/hh_rlhf_rm_open_llama_3b`). It is scored with its own tokenizer, in batches of
  texts sorted by length, on the text `template.format(prompt=..., response=...)`, truncated to its max length.

`vader_sentiment` is the offline demo's reward: the VADER compound sentiment of the response, in [-1, 1]
(vaderSentiment ships its lexicon inside the package, so it needs no download).

`score(fn, prompts, responses)` calls a reward and checks what comes back: a callable that raises or returns the
wrong number of values is a one-line error; NaN/inf values come back as NaN and the caller excludes those samples.
"""
import importlib
import importlib.util
import math
import os

import torch

_vader = None


def vader_sentiment(prompts: list[str], responses: list[str]) -> list[float]:
    """VADER compound sentiment of each response (the prompt is ignored): +1 very positive, -1 very negative."""
    global _vader
    if _vader is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        _vader = SentimentIntensityAnalyzer()
    return [_vader.polarity_scores(r)["compound"] for r in responses]


def _load_callable(spec: str):
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        if not os.path.exists(target):
            raise SystemExit(f"--reward {spec!r}: file {target!r} does not exist")
        mod_spec = importlib.util.spec_from_file_location(os.path.basename(target)[:-3], target)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise SystemExit(f"--reward {spec!r}: cannot import module {target!r} ({e})")
    fn = getattr(module, name, None)
    if not callable(fn):
        raise SystemExit(f"--reward {spec!r}: {target!r} has no function {name!r}")
    return fn


def _load_model_reward(path: str, template: str, batch_size: int, device, dtype, trust_remote_code=False):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype,
                                                               trust_remote_code=trust_remote_code)
    if tok.pad_token is None:  # Llama-style reward models have none; padding is masked, so EOS serves
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    tok.padding_side = "right"
    model.to(device).eval()
    max_len = min(tok.model_max_length, getattr(model.config, "max_position_embeddings", 1 << 30))

    @torch.no_grad()
    def reward_model(prompts, responses):
        texts = [template.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
        lengths = [len(t) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])  # similar lengths share a batch: less padding
        out = [0.0] * len(texts)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                      max_length=max_len).to(device)
            logits = model(**enc).logits[:, 0].float().tolist()  # [batch]
            for i, v in zip(idx, logits):
                out[i] = v
        return out

    return reward_model


def load_reward(spec: str, template: str = "{prompt}{response}", batch_size: int = 32, device="cpu",
                dtype=torch.float32, trust_remote_code: bool = False):
    """A reward callable from `file.py:function`, `module:function`, or a sequence-classification model."""
    if ":" in spec and not os.path.isdir(spec):
        return _load_callable(spec)
    return _load_model_reward(spec, template, batch_size, device, dtype, trust_remote_code)


def score(fn, prompts: list[str], responses: list[str]) -> list[float]:
    """Call a reward and check its answer; NaN/inf come back as NaN (the caller skips those samples)."""
    try:
        values = list(fn(prompts, responses))
    except Exception as e:
        raise SystemExit(f"--reward raised {type(e).__name__}: {e} (on {len(prompts)} samples); fix the reward")
    if len(values) != len(prompts):
        raise SystemExit(f"--reward returned {len(values)} values for {len(prompts)} samples; it must return one "
                         f"float per (prompt, response)")
    out = []
    for v in values:
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise SystemExit(f"--reward returned {v!r}, not a number; it must return floats")
        out.append(v if math.isfinite(v) else float("nan"))
    return out
