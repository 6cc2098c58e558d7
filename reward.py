"""Rewards for RAFT: r(prompt, response) -> float, batched.

`load_rewards` builds the weighted sum r = Σ w_i r_i of the --reward specs, each a Python callable (`file.py:function`,
whose file is executed, or `module:function`) or a sequence-classification reward model (`load_reward`), and passes
each callable the dataset columns its signature names; `score` checks what a reward returns. `reward_ids` is the
text a reward model scores, shared with rm.py, whose directories (with rm.json) load here and score as rm.py scored
them: their template or chat template, LoRA adapters on their base. The demo's reward,
`vader_sentiment`, is here; the answer-checking rewards for reasoning are math_reward.py's. Ranking and keeping
samples are raft.py's, not this file's. Imports no kit module.
"""

import importlib
import importlib.util
import inspect
import json
import math
import os
import re

import torch

TEMPLATE = "{prompt} {response}"  # the text a reward model scores (--reward_template)
_vader = None


def vader_sentiment(prompts: list[str], responses: list[str]) -> list[float]:
    """VADER compound sentiment of each response (the prompt is ignored): +1 very positive, -1 very negative."""
    global _vader
    if _vader is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _vader = SentimentIntensityAnalyzer()
    return [_vader.polarity_scores(r)["compound"] for r in responses]


# ---- numbers in text: exact_number (math_reward.py) and maj@n (metrics.py) read them -----------------------------
# a number: an optional minus not glued to a word (so "5-3" ends in 3, not -3), thousands commas, a decimal part;
# a full stop after it is not part of it
NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+")


def last_number(text: str):
    """The last number in text without its thousands commas ("1,234.50" -> "1234.50"), or None."""
    found = NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


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


RM_FILE = "rm.json"  # beside a reward model trained by rm.py: how it scores texts, and the base of its adapters
_CUES = re.compile(r"###(Human|Assistant):")


def chat_messages(prompt: str, response: str) -> list[dict]:
    """The conversation a chat-template reward model scores: the prompt's `###Human: …###Assistant:` turns (the
    text rewards see for HH-RLHF; any other prompt is one user turn), then the response as the assistant's turn."""
    parts = _CUES.split(prompt)
    turns = [("Human", parts[0])] if parts[0].strip() else []
    turns += list(zip(parts[1::2], parts[2::2]))
    if turns and turns[-1][0] == "Assistant" and not turns[-1][1].strip():
        turns.pop()  # the empty cue where the response goes
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": t.strip()} for r, t in turns] + [{"role": "assistant", "content": response}]


def reward_ids(tok, prompts: list[str], responses: list[str], template: str = TEMPLATE, chat: bool = False):
    """The token ids a reward model scores for each (prompt, response): `template` filled in (the response stripped,
    so the template alone decides the spacing) and encoded with the tokenizer's special tokens, or with chat=True the
    conversation through the tokenizer's chat template (which writes its own special tokens). rm.py trains on these
    ids and reward models score them, so a trained model is scored as it was evaluated."""
    if chat:
        texts = [
            tok.apply_chat_template(chat_messages(p, r.strip()), tokenize=False) for p, r in zip(prompts, responses)
        ]
        return tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    texts = [template.format(prompt=p, response=r.strip()) for p, r in zip(prompts, responses)]
    return tok(texts)["input_ids"] if texts else []


def rm_info(path: str) -> dict:
    """rm.json of a directory trained by rm.py ({} for any other reward model): template, chat_template, base, ..."""
    f = os.path.join(path, RM_FILE)
    if not os.path.isfile(f):
        return {}
    with open(f, encoding="utf-8") as fh:
        return json.load(fh)


def _load_model_reward(
    path, template=TEMPLATE, batch_size=32, device="cpu", trust_remote_code=False, offload=False, load_in_8bit=False
):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # a directory from rm.py scores as it was trained: its template or chat template, its adapters on their base
    info = rm_info(path) if os.path.isdir(path) else {}
    if info and template not in (TEMPLATE, info["template"]):
        raise SystemExit(f"--reward {path}: --reward_template {template!r} differs from {info['template']!r}, the "
                         f"template it was trained with ({RM_FILE}); drop --reward_template")  # fmt: skip
    template, chat = info.get("template", template), info.get("chat_template", False)
    load_in_8bit = load_in_8bit or info.get("load_in_8bit", False)  # adapters trained on an 8-bit base score on one
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 halves memory and time
    kw = {}
    if load_in_8bit:  # int8 linear layers (bitsandbytes): about half of bf16's memory; placed on `device` for good
        from transformers import BitsAndBytesConfig

        kw = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": device}}
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            info.get("base") or path, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code, **kw
        )
    except (OSError, ValueError) as e:
        raise SystemExit(
            f"--reward {path!r}: not file.py:function or module:function, and cannot load a "
            f"sequence-classification model ({str(e).splitlines()[0]})"
        )
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id  # Llama RMs have no pad; masked
    model.config.pad_token_id = pad
    model.config.use_cache = False  # a score needs no KV cache (the 3B one: 4 GB at 32 texts of 385 tokens)
    if info.get("base"):  # LoRA adapters (and the trained score head) on the base they were trained on
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path)
    if not load_in_8bit:
        model.to("cpu" if offload else device)
    model.eval()
    max_len = min(tok.model_max_length, getattr(model.config, "max_position_embeddings", 1 << 30))

    @torch.no_grad()
    def reward_model(prompts, responses):
        enc = reward_ids(tok, prompts, responses, template, chat)
        cut = [len(ids) > max_len for ids in enc]
        lead = [1 if tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id] else 0 for ids in enc]
        enc = [ids[:k] + ids[len(ids) - max_len + k :] if c else ids for ids, c, k in zip(enc, cut, lead)]
        reward_model.truncated = sum(cut)
        if reward_model.truncated:
            print(
                f"reward model {path}: {sum(cut)} of {len(enc)} texts were longer than {max_len} tokens and were "
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


def load_reward(spec: str, **model_options):
    """A reward callable from `file.py:function`, `module:function`, or a sequence-classification model loaded with
    `model_options` (template, batch_size, device, trust_remote_code, offload, load_in_8bit)."""
    if ":" in spec and not os.path.isdir(spec):
        return _load_callable(spec)
    return _load_model_reward(spec, **model_options)


def parse_weights(weights: str, n: int) -> list[float]:
    """--reward_weights "1,0.5" -> [1.0, 0.5]; empty -> all 1. NaN, inf and all zeros are refused."""
    if not weights:
        return [1.0] * n
    try:
        w = [float(x) for x in weights.split(",")]
    except ValueError:
        w = []
    if len(w) != n or not all(map(math.isfinite, w)):
        raise SystemExit(f"--reward_weights {weights!r}: give {n} comma-separated finite numbers, one per --reward")
    if not any(w):
        raise SystemExit(f"--reward_weights {weights!r}: every weight is 0, so is every reward; weigh one at least")
    return w


def reward_columns(fn, spec: str, available: list[str]) -> list[str]:
    """The dataset columns a reward callable takes, from its signature: the keyword parameters after prompts and
    responses (one with a default only where the data has it), or every column with **kwargs."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature takes (prompts, responses)
        return []
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return list(available)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    named = [p for p in positional[2:] if p.kind == p.POSITIONAL_OR_KEYWORD]  # (*args takes what is not named)
    named += [p for p in params if p.kind == p.KEYWORD_ONLY]
    missing = [p.name for p in named if p.default is p.empty and p.name not in available]
    if missing:
        raise SystemExit(f"--reward {spec} takes the dataset column {missing[0]!r}, which the data does not have "
                         f"(columns available: {available}); use a dataset with it or another reward")  # fmt: skip
    return [p.name for p in named if p.name in available]


def load_rewards(specs: list[str], weights: str = "", prompt_view=None, columns=None, **model_options):
    """One reward r = Σ w_i r_i over the --reward specs (`weights` like "1,0.5", default all 1); reward models load
    with `model_options` (see load_reward). `prompt_view` maps each prompt the policy saw to the text the rewards
    score; `columns` maps a prompt to {column: value}. After each call fn.stats holds what the caller logs
    (reward_<i>_mean, reward_truncated); fn.columns names the columns taken."""
    w = parse_weights(weights, len(specs))
    fns = [load_reward(s, **model_options) for s in specs]
    columns = columns or {}
    available = sorted({k for c in columns.values() for k in c})
    takes = [reward_columns(fn, spec, available) for fn, spec in zip(fns, specs)]

    def combined(prompts, responses):
        rows = [columns.get(p) for p in prompts]
        if prompt_view is not None:
            prompts = [prompt_view.get(p, p) for p in prompts]
        rows = [row if row is not None else columns.get(p) for row, p in zip(rows, prompts)]  # keyed by either text
        for spec, cols in zip(specs, takes):
            if cols and None in rows:
                p = prompts[rows.index(None)][:80]
                raise SystemExit(f"--reward {spec}: no dataset columns for the prompt {p!r}; pass columns for every "
                                 f"prompt it scores")  # fmt: skip
        parts = [
            score(fn, prompts, responses, spec, {c: [row.get(c) for row in rows] for c in cols})
            for fn, spec, cols in zip(fns, specs, takes)
        ]
        combined.stats = {}
        if len(fns) > 1:
            combined.stats = {f"reward_{i}_mean": torch.tensor(v).nanmean().item() for i, v in enumerate(parts)}
        models = [fn for fn in fns if hasattr(fn, "truncated")]
        if models:
            combined.stats["reward_truncated"] = sum(fn.truncated for fn in models)
        return [sum(wi * v for wi, v in zip(w, vals)) for vals in zip(*parts)]  # a NaN part makes the sum NaN

    combined.stats = {}
    combined.columns = sorted(set().union(*takes))
    return combined


def score(fn, prompts: list[str], responses: list[str], name: str = "", columns=None) -> list[float]:
    """Call a reward (with `columns`: column -> one value per sample, as keyword arguments) and check its answer;
    NaN/inf come back as NaN (the caller skips those samples)."""
    flag = f"--reward {name}".strip()
    try:
        values = list(fn(prompts, responses, **(columns or {})))
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
