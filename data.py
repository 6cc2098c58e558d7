"""Prompts for RAFT (plain prompt files and HH-RLHF conversations), the offline demo's synthetic reviews, and the
run directory's files.

- `load_rows(dataset, split)` reads a `.jsonl` file (one split: all its rows), a `.json` file (a list of objects,
  or an object of splits), or with `datasets.load_dataset` a directory of `<split>.jsonl` files or an HF dataset by
  name (the paper's `Dahoas/full-hh-rlhf`: columns `prompt`, `response`, `chosen`, `rejected`).
- `format_prompts(rows, ...)` turns rows into records: `prompt` (the text the policy sees), `reward_prompt` (the
  text a reward sees) and any requested response fields (e.g. `chosen` for SFT and eval). `--prompt_format`:
  - `raw`: the prompt as it is (plain prompt files; the demo). A missing, non-string or blank prompt is a
    one-line error naming the row: a hand-written file with a blank prompt has a mistake to fix.
  - `hh`: an HH-RLHF conversation "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant:" is cut into turns
    (at a blank line followed by `Human:` or `Assistant:`; each turn's text stripped, so odd spacing is
    normalised) and written as the paper's text `###Human: q1###Assistant: a1###Human: q2###Assistant:`, which is
    the dataset with "\n\nHuman"/"\n\nAssistant" replaced by "###Human"/"###Assistant", as the paper's reward
    model was trained. Rows with no human text, or a blank requested response, are skipped and counted by the
    caller: a public dataset of 112K rows has a few such rows, and they should not stop a run.
  - `auto` (default): `hh` when the rows carry HH-RLHF's `chosen` and `rejected` fields, else `raw`.
  With `--chat_template` the turns (a raw prompt is one user turn) are rendered with the tokenizer's
  `apply_chat_template` for the policy instead; rewards still see `reward_prompt` (the `###Human` text, or the raw
  prompt), since a reward model scores the text it was trained on, not the policy's chat markup.
  Responses read from the data are stripped and, in the `###Human` text, start with one space, as in the dataset.
- `stop_strings(fmt, stop)`: with `hh` and no `--stop`, a response stops at the next human turn (`HH_STOP`:
  `###Human`, `Human:`), as in the paper.
- `demo_reviews(n, seed)` writes `n` short reviews of mixed sentiment from a small grammar; `demo_prompts` cuts
  the neutral openings of fresh reviews into prompts. The demo (raft.py with no `--model`) first trains a tiny
  Llama on the reviews, then aligns it with RAFT toward positive reviews (VADER sentiment), mirroring the first
  arXiv version of the paper (GPT-2 on IMDB toward positive reviews).
- `train_demo_tokenizer(texts)` trains a small byte-level BPE tokenizer with `tokenizers` (a dependency of
  transformers) and wraps it as a `PreTrainedTokenizerFast`, so it saves and loads like any HF tokenizer.
- The run directory (raft.py's --out_dir): `check_run_dir` (writable; new, or --resume with the same config.json),
  `save_stage` (iter_XXXX/: the model, selected.jsonl, eval_samples.jsonl, metrics.json), `completed_stages`,
  `prune_models` (--keep_last) and `write_metrics` (metrics.jsonl and, with eval.plot_rewards, reward_curve.png).
  Files and stage directories are written aside and renamed (`write_text`, `write_jsonl`), so a crash never leaves
  half of one.
"""

import dataclasses
import json
import os
import random
import re
import shutil

from eval import plot_rewards

FORMATS = ("auto", "hh", "raw")
HH_STOP = ["###Human", "Human:"]  # the next human turn: the paper stopped responses there
# a turn starts at the beginning or after a blank line (spaces allowed), with "Human:" or "Assistant:"
_CUE = re.compile(r"(?:^|\n\s*\n)\s*(Human|Assistant):")


def load_rows(dataset: str, split: str = "train"):
    """Rows (dicts) of a local .jsonl/.json file, or of a directory or HF dataset name via datasets.load_dataset."""
    if os.path.isfile(dataset):
        with open(dataset, encoding="utf-8") as f:
            text = f.read()
        if dataset.endswith(".jsonl"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
            if isinstance(rows, dict) and split not in rows:
                raise SystemExit(f"--dataset {dataset!r} has no split {split!r} (it has {sorted(rows)})")
            rows = rows[split] if isinstance(rows, dict) else rows
    else:  # a directory of <split>.jsonl files loads exactly as a hub dataset does
        try:
            import datasets

            rows = datasets.load_dataset(dataset, split=split)
        except Exception as e:  # the hub or the name is wrong: say so in one line, not a deep traceback
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise SystemExit(f"--dataset {dataset!r} split {split!r}: not a local file and not loadable ({msg})")
    if not len(rows):
        raise SystemExit(f"--dataset {dataset!r} has no rows")
    return rows


def hh_turns(text: str) -> list[tuple[str, str]]:
    """(role, text) turns of an HH-RLHF conversation; text before the first cue is a human turn; the final empty
    assistant cue (where the response goes) is dropped."""
    parts = _CUE.split(text.strip())
    turns = [("Human", parts[0].strip())] if parts[0].strip() else []
    turns += [(role, body.strip()) for role, body in zip(parts[1::2], parts[2::2])]
    if turns and turns[-1] == ("Assistant", ""):
        turns.pop()
    return turns


def hh_text(turns) -> str:
    """The paper's prompt text: `###Human: q1###Assistant: a1###Human: q2###Assistant:`."""
    return "".join(f"###{role}: {text}" for role, text in turns) + "###Assistant:"


def chat_text(tok, turns) -> str:
    """The turns through the tokenizer's chat template, ending with the assistant's generation cue."""
    messages = [{"role": "user" if role == "Human" else "assistant", "content": text} for role, text in turns]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # the template may write BOS as text; encoding adds BOS itself, so a second one would be out of distribution
    return text[len(tok.bos_token) :] if tok.bos_token and text.startswith(tok.bos_token) else text


def dataset_response(text: str, fmt: str, chat_template: bool) -> str:
    """A response from the data in the form the policy writes it: stripped, and after the paper's `###Assistant:`
    cue with one leading space, as in the dataset; raw text as it is."""
    return text.strip() if chat_template else " " + text.strip() if fmt == "hh" else text


def stop_strings(fmt: str, stop: list[str]) -> list[str]:
    """--stop, or for HH conversations without one the next human turn (the paper cut responses there)."""
    return list(stop) or (list(HH_STOP) if fmt == "hh" else [])


def resolve_format(prompt_format: str, rows) -> str:
    """auto -> hh for rows in the HH-RLHF schema (chosen and rejected beside the prompt), else raw."""
    if prompt_format != "auto":
        return prompt_format
    first = rows[0]
    return "hh" if isinstance(first, dict) and {"chosen", "rejected"} <= set(first) else "raw"


def format_prompts(
    rows,
    field: str = "prompt",
    prompt_format: str = "auto",
    tok=None,
    chat_template: bool = False,
    responses=(),
    name: str = "--dataset",
) -> tuple[list[dict], str]:
    """Records {row, prompt, reward_prompt, <response fields>} of the usable rows, and the resolved format.
    len(rows) - len(records) rows were skipped (hh: no human text or a blank response)."""
    fmt = resolve_format(prompt_format, rows)
    if chat_template and (tok is None or not getattr(tok, "chat_template", None)):
        raise SystemExit(
            "--chat_template: the model's tokenizer has no chat template; drop --chat_template (the "
            "paper's ###Human text is the default for HH-RLHF) or use a chat model"
        )
    records = []
    for i, row in enumerate(rows):
        row = row if isinstance(row, dict) else {}
        value = row.get(field)
        bad = [
            f for f in (field, *responses) if not isinstance(row.get(f), str) or (fmt == "raw" and not row[f].strip())
        ]
        if bad:
            flag = "--prompt_field" if bad[0] == field else "--sft_field"
            raise SystemExit(
                f"{name} row {i}: field {bad[0]!r} is missing, not a string, or empty (got "
                f"{row.get(bad[0])!r}); fix the row or pass {flag}"
            )
        if fmt == "raw":
            turns, reward_prompt = [("Human", value)], value
        else:
            turns = hh_turns(value)
            if not any(role == "Human" and text for role, text in turns) or any(not row[f].strip() for f in responses):
                continue  # skipped; the caller reports len(rows) - len(records)
            reward_prompt = hh_text(turns)
        rec = {
            "row": i,
            "prompt": chat_text(tok, turns) if chat_template else reward_prompt,
            "reward_prompt": reward_prompt,
        }
        rec.update({f: dataset_response(row[f], fmt, chat_template) for f in responses})
        records.append(rec)
    if not records:
        raise SystemExit(f"{name} has no usable rows (all {len(rows)} have an empty prompt or response)")
    return records, fmt


def load_prompts(
    dataset: str,
    split: str = "train",
    field: str = "prompt",
    prompt_format: str = "auto",
    tok=None,
    chat_template: bool = False,
    responses=(),
) -> tuple[list[dict], str, int]:
    """format_prompts(load_rows(dataset, split), ...) -> (records, resolved format, rows skipped)."""
    rows = load_rows(dataset, split)
    records, fmt = format_prompts(rows, field, prompt_format, tok, chat_template, responses)
    return records, fmt, len(rows) - len(records)


# ---- the offline demo: a grammar of short movie reviews -------------------------------------------------
# Openers are neutral, so a prompt (the opener) says nothing about the sentiment of what follows. Each review
# leans positive or negative, but mixes in clauses of the other side, so the pretrained model is ambivalent.
_GENRES = [
    "comedy",
    "drama",
    "thriller",
    "western",
    "musical",
    "horror film",
    "war film",
    "cartoon",
    "romance",
    "mystery",
    "sequel",
    "remake",
    "documentary",
    "space opera",
    "heist movie",
    "biopic",
]
_THINGS = [
    "acting",
    "plot",
    "script",
    "music",
    "ending",
    "camera work",
    "dialogue",
    "cast",
    "story",
    "pacing",
    "soundtrack",
    "lead actor",
    "villain",
    "editing",
    "humor",
    "score",
    "set design",
    "final act",
]
_WHEN = [
    "last night",
    "on friday",
    "this weekend",
    "yesterday",
    "last week",
    "on sunday",
    "after work",
    "on my birthday",
    "on a rainy day",
    "at midnight",
]
_WHO = ["my sister", "my dad", "my friend", "my wife", "my brother", "my roommate", "my mom", "my neighbor"]
_WHERE = [
    "at the cinema",
    "on tv",
    "on a plane",
    "at home",
    "at a festival",
    "on my laptop",
    "at the drive-in",
    "in a small theater",
]
_TOPICS = [
    "a small town",
    "two brothers",
    "a lost dog",
    "a bank heist",
    "a young chef",
    "an old soldier",
    "a haunted house",
    "a robot",
    "a tennis star",
    "a family farm",
]
_OPENERS = [
    "i watched this {g} {when} and",
    "{who} and i saw the new {g} {when} and",
    "i rented this {g} {where} and",
    "this {g} about {topic} came out {when} and",
    "we went to see this {g} {where} and",
    "{who} picked this {g} {when} and",
    "the {g} about {topic} is finally here and",
    "i finally caught this {g} {where} and",
    "after reading the book i saw this {g} {where} and",
    "this is a {g} about {topic} and",
]
_POS_ADJ = [
    "great",
    "wonderful",
    "brilliant",
    "superb",
    "lovely",
    "beautiful",
    "excellent",
    "charming",
    "fun",
    "delightful",
    "clever",
    "amazing",
    "fantastic",
    "moving",
    "sweet",
    "strong",
    "perfect",
    "good",
]
_NEG_ADJ = [
    "terrible",
    "awful",
    "boring",
    "dull",
    "weak",
    "bad",
    "horrible",
    "stupid",
    "painful",
    "ugly",
    "lame",
    "dreadful",
    "annoying",
    "sad",
    "poor",
    "messy",
    "silly",
    "tedious",
]
_POS_CLAUSES = [
    "the {t} was {a}",
    "the {t} is {a} and {a2}",
    "i loved the {t}",
    "what a {a} {t}",
    "the {t} made me smile",
    "the {t} felt {a}",
    "it was a joy to watch",
    "i would watch it again",
    "the {t} is really {a}",
    "everyone enjoyed the {t}",
    "the {t} deserves praise",
]
_NEG_CLAUSES = [
    "the {t} was {a}",
    "the {t} is {a} and {a2}",
    "i hated the {t}",
    "what a {a} {t}",
    "the {t} made me cringe",
    "the {t} felt {a}",
    "it was a waste of time",
    "i want my money back",
    "the {t} is really {a}",
    "nobody liked the {t}",
    "the {t} is a disaster",
]
_NEUTRAL_CLAUSES = [
    "it runs about two hours",
    "the {t} reminded me of an old {g}",
    "it was shot in the winter",
    "the {t} changes halfway through",
    "we had popcorn",
    "the theater was full",
]
_JOINERS = [". ", ", and ", ". also ", ", but ", ". "]


def _clause(rng, positive):
    if rng.random() < 0.15:
        template = rng.choice(_NEUTRAL_CLAUSES)
    else:
        template = rng.choice(_POS_CLAUSES if positive else _NEG_CLAUSES)
    adjs = _POS_ADJ if positive else _NEG_ADJ
    a, a2 = rng.sample(adjs, 2)
    return template.format(t=rng.choice(_THINGS), a=a, a2=a2, g=rng.choice(_GENRES))


def _review(rng):
    opener = rng.choice(_OPENERS).format(
        g=rng.choice(_GENRES),
        when=rng.choice(_WHEN),
        who=rng.choice(_WHO),
        where=rng.choice(_WHERE),
        topic=rng.choice(_TOPICS),
    )
    leans_positive = rng.random() < 0.5
    clauses = [
        _clause(rng, leans_positive if rng.random() < 0.75 else not leans_positive) for _ in range(rng.randint(2, 3))
    ]
    body = clauses[0]
    for c in clauses[1:]:
        body += rng.choice(_JOINERS) + c
    return opener, " " + body + "."


def demo_reviews(n: int, seed: int) -> list[str]:
    """`n` synthetic reviews of mixed sentiment (about half lean positive, each mixes in the other side)."""
    rng = random.Random(seed)
    return ["".join(_review(rng)) for _ in range(n)]


def demo_prompts(n: int, seed: int) -> list[str]:
    """`n` prompts: the neutral openers of fresh reviews (a different seed than the training corpus)."""
    rng = random.Random(seed)
    return [_review(rng)[0] for _ in range(n)]


def train_demo_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts`, with <s> (added in front of every text), </s> and <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


# ---- the run directory ---------------------------------------------------------------------------------------
# Every file and stage directory is written aside and renamed, so a crash never leaves half of one: a stage
# directory that exists is complete, and --resume continues after the last one.
def write_text(path, text: str):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_jsonl(path, rows):
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def check_run_dir(cfg):
    """--out_dir (of a raft.Config) is writable, and new, or --resume with the saved config.json (differences only
    with --resume_force); removes the .tmp leftovers of a stage cut off while saving, and saves the config."""
    cfg_path = os.path.join(cfg.out_dir, "config.json")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        write_text(os.path.join(cfg.out_dir, "write_test"), "")
        os.remove(os.path.join(cfg.out_dir, "write_test"))
    except OSError as e:
        raise SystemExit(f"--out_dir {cfg.out_dir}: not writable ({e.strerror}); choose another directory")
    saved = dataclasses.asdict(cfg)
    if not cfg.resume and os.listdir(cfg.out_dir):
        raise SystemExit(f"--out_dir {cfg.out_dir} is not empty; pass --resume to continue it or choose a new dir")
    if cfg.resume and os.path.exists(cfg_path):
        with open(cfg_path) as f:
            old = json.load(f)
        diff = [k for k in saved if k not in ("resume", "resume_force", "iterations") and old.get(k) != saved[k]]
        if diff and not cfg.resume_force:
            raise SystemExit(
                f"--resume: the config differs from {cfg_path} in {diff}; use the saved settings or add --resume_force"
            )
        if diff:
            print(f"--resume_force: continuing with changed {', '.join(f'{k}={saved[k]!r}' for k in diff)}", flush=True)
    for d in os.listdir(cfg.out_dir):  # leftovers of a stage cut off while saving: it is redone
        if d.endswith(".tmp"):
            shutil.rmtree(os.path.join(cfg.out_dir, d), ignore_errors=True)
    write_text(cfg_path, json.dumps(saved, indent=1))


def save_stage(out_dir, t, metrics, rows=None, eval_rows=None, model=None, tok=None, after_model=None, state_dict=None):
    """Write iter_{t:04d}/ aside and rename it in place, so a directory that exists is complete. after_model() runs
    once the model is written, before the rename (raft.py's crash test hook). state_dict: the full weights of a
    sharded (FSDP2) model, gathered by the caller."""
    final = os.path.join(out_dir, f"iter_{t:04d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if model is not None:
        model.save_pretrained(tmp, state_dict=state_dict)
        tok.save_pretrained(tmp)
        if after_model:
            after_model()
    if rows is not None:
        write_jsonl(os.path.join(tmp, "selected.jsonl"), rows)
    write_jsonl(os.path.join(tmp, "eval_samples.jsonl"), eval_rows or [])
    write_text(os.path.join(tmp, "metrics.json"), json.dumps(metrics))
    os.replace(tmp, final)


def save_model_dir(out, model, tok, state_dict=None, files=None):
    """A model and tokenizer (plus `files`, name -> text) written to out + ".tmp" and renamed to `out`, replacing
    what was there: a reader never sees half a model (--sft_only, --merge_lora, the demo's starting model)."""
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    tok.save_pretrained(tmp)
    for name, text in (files or {}).items():
        write_text(os.path.join(tmp, name), text)
    shutil.rmtree(out, ignore_errors=True)  # os.replace needs the name free
    os.replace(tmp, out)


def completed_stages(out_dir) -> list[int]:
    return sorted(int(d[5:]) for d in os.listdir(out_dir) if re.fullmatch(r"iter_\d{4}", d))


def prune_models(out_dir, keep_last: int):
    """--keep_last: delete the model files of all but the last N completed stages (metrics and kept sets stay)."""
    stages = [t for t in completed_stages(out_dir) if t > 0]
    for t in stages[:-keep_last] if keep_last else []:
        d = os.path.join(out_dir, f"iter_{t:04d}")
        for name in os.listdir(d):
            if name not in ("metrics.json", "selected.jsonl", "eval_samples.jsonl"):
                os.remove(os.path.join(d, name))


def write_metrics(out_dir, stages):
    """metrics.jsonl and reward_curve.png, rebuilt from the completed stage directories."""
    rows = []
    for t in stages:
        with open(os.path.join(out_dir, f"iter_{t:04d}", "metrics.json")) as f:
            rows.append(json.load(f))
    write_jsonl(os.path.join(out_dir, "metrics.jsonl"), rows)
    plot_rewards(rows, os.path.join(out_dir, "reward_curve.png"))
    return rows
