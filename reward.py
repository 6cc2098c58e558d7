"""Rewards for RAFT: r(prompt, response) -> float, batched.

`load_reward(spec)` accepts
- `path/to/file.py:function` or `module:function`: a Python callable `f(prompts: list[str], responses: list[str])
  -> list[float]` (TRL's reward-function convention). Note: a file path is *executed* as Python code.
- anything else: the hub id or local path of an `AutoModelForSequenceClassification` reward model with one output
  (e.g. the paper's `weqweasdas/hh_rlhf_rm_open_llama_3b`), scored with its own tokenizer on the text
  `template.format(prompt=..., response=response.strip())` (default `{prompt} {response}`, which gives the paper's
  `###Human: q###Assistant: a` for HH-RLHF prompts: the response is stripped so the template decides the spacing).
  Texts are tokenised once and scored in batches sorted by token length (less padding), in bf16 on a GPU and fp32
  on a CPU. A text longer than the model's maximum length is cut from the left, keeping BOS, so the response (what
  is judged) stays whole; the number of cut texts is printed and logged. With `offload=True` the model waits on the
  CPU between scorings and visits the GPU only to score (RAFT's point: one model at a time on the GPU suffices).
  With `load_in_8bit=True` (`--reward_load_in_8bit`) its linear layers are int8 (bitsandbytes): about half the
  memory of bf16, slower, and it stays where it was loaded (no offloading).

`load_rewards(specs, weights)` combines several rewards into r = Σ w_i r_i (one or more `--reward`, weights from
`--reward_weights`, default all 1). After every call `fn.stats` holds what the caller logs: `reward_<i>_mean` for
each reward i (from 0, in the order given; only with several rewards) and `reward_truncated` (only with a reward
model). `prompt_view` maps each prompt the policy saw to the text the rewards score (the `###Human` conversation
when the policy sees a chat template; see data.py).

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


def _load_model_reward(
    path: str,
    template: str,
    batch_size: int,
    device,
    dtype=None,
    trust_remote_code=False,
    offload=False,
    load_in_8bit=False,
):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)  # bf16 halves memory and time
    kw = {}
    if load_in_8bit:  # int8 linear layers (bitsandbytes): about half of bf16's memory; placed on `device` for good
        from transformers import BitsAndBytesConfig

        kw = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": device}}
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code, **kw
        )
    except (OSError, ValueError) as e:
        raise SystemExit(
            f"--reward {path!r}: not file.py:function or module:function, and cannot load a "
            f"sequence-classification model ({str(e).splitlines()[0]})"
        )
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id  # Llama RMs have no pad; masked
    model.config.pad_token_id = pad
    if not load_in_8bit:
        model.to("cpu" if offload else device)
    model.eval()
    max_len = min(tok.model_max_length, getattr(model.config, "max_position_embeddings", 1 << 30))
    lead = 1 if tok.bos_token_id is not None and tok("")["input_ids"][:1] == [tok.bos_token_id] else 0

    @torch.no_grad()
    def reward_model(prompts, responses):
        texts = [template.format(prompt=p, response=r.strip()) for p, r in zip(prompts, responses)]
        enc = tok(texts)["input_ids"]
        cut = [len(ids) > max_len for ids in enc]
        enc = [ids[:lead] + ids[len(ids) - max_len + lead :] if c else ids for ids, c in zip(enc, cut)]
        reward_model.truncated = sum(cut)
        if reward_model.truncated:
            print(
                f"reward model {path}: {sum(cut)} of {len(texts)} texts were longer than {max_len} tokens and were "
                f"cut from the left (the response is kept whole)",
                flush=True,
            )
        if offload:
            model.to(device)
        out = score_ids(model, enc, batch_size, pad)
        if offload:
            model.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return out

    reward_model.truncated = 0
    reward_model.model = model  # for inspection (tests check its int8 layers)
    return reward_model


@torch.no_grad()
def score_ids(model, enc: list[list[int]], batch_size: int, pad: int) -> list[float]:
    """A sequence-classification model's score of each token list, in batches of batch_size texts sorted by length
    (longest first: similar lengths share a batch, so little padding; the first batch shows at once whether the
    longest texts fit in memory). Right padding, masked: the model reads its score at the last real token."""
    device = next(model.parameters()).device
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    out = [0.0] * len(enc)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        L = len(enc[idx[0]])
        ids = torch.full((len(idx), L), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), L), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(enc[i])], mask[r, : len(enc[i])] = torch.tensor(enc[i]), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float().tolist()
        for i, v in zip(idx, logits):
            out[i] = v
    return out


def load_reward(
    spec: str,
    template: str = "{prompt} {response}",
    batch_size: int = 32,
    device="cpu",
    dtype=None,
    trust_remote_code: bool = False,
    offload: bool = False,
    load_in_8bit: bool = False,
):
    """A reward callable from `file.py:function`, `module:function`, or a sequence-classification model."""
    if ":" in spec and not os.path.isdir(spec):
        return _load_callable(spec)
    return _load_model_reward(spec, template, batch_size, device, dtype, trust_remote_code, offload, load_in_8bit)


def parse_weights(weights: str, n: int) -> list[float]:
    """--reward_weights "1,0.5" -> [1.0, 0.5]; empty -> all 1."""
    if not weights:
        return [1.0] * n
    try:
        w = [float(x) for x in weights.split(",")]
    except ValueError:
        w = []
    if len(w) != n:
        raise SystemExit(f"--reward_weights {weights!r}: give {n} comma-separated numbers, one per --reward")
    return w


def load_rewards(
    specs: list[str],
    weights: str = "",
    template: str = "{prompt} {response}",
    batch_size: int = 32,
    device="cpu",
    trust_remote_code: bool = False,
    offload: bool = False,
    prompt_view=None,
    load_in_8bit: bool = False,
):
    """One reward r = Σ w_i r_i over the --reward specs; fn.stats holds the last call's per-reward means."""
    w = parse_weights(weights, len(specs))
    fns = [
        load_reward(
            s,
            template,
            batch_size,
            device,
            trust_remote_code=trust_remote_code,
            offload=offload,
            load_in_8bit=load_in_8bit,
        )
        for s in specs
    ]

    def combined(prompts, responses):
        if prompt_view is not None:
            prompts = [prompt_view.get(p, p) for p in prompts]
        parts = [score(fn, prompts, responses, spec) for fn, spec in zip(fns, specs)]
        combined.stats = {}
        if len(fns) > 1:
            combined.stats = {f"reward_{i}_mean": torch.tensor(v).nanmean().item() for i, v in enumerate(parts)}
        models = [fn for fn in fns if hasattr(fn, "truncated")]
        if models:
            combined.stats["reward_truncated"] = sum(fn.truncated for fn in models)
        return [sum(wi * v for wi, v in zip(w, vals)) for vals in zip(*parts)]  # a NaN part makes the sum NaN

    combined.stats = {}
    return combined


def score(fn, prompts: list[str], responses: list[str], name: str = "") -> list[float]:
    """Call a reward and check its answer; NaN/inf come back as NaN (the caller skips those samples)."""
    flag = f"--reward {name}".strip()
    try:
        values = list(fn(prompts, responses))
    except Exception as e:
        raise SystemExit(f"{flag} raised {type(e).__name__}: {e} (on {len(prompts)} samples); fix the reward")
    if len(values) != len(prompts):
        raise SystemExit(
            f"{flag} returned {len(values)} values for {len(prompts)} samples; it must return one "
            f"float per (prompt, response)"
        )
    out = []
    for v in values:
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise SystemExit(f"{flag} returned {v!r}, not a number; it must return floats")
        out.append(v if math.isfinite(v) else float("nan"))
    return out
