"""Data in and out: prompts from files and datasets, text to token ids, the held-out split, and the run directory.

`load_prompts` reads rows (`load_rows`) and turns them into records (`format_prompts`): `prompt` (what the policy
sees), `reward_prompt` (what a reward sees) and `columns` (the row's fields a reward may take), in the format that
--prompt_format names (raw, hh, gsm8k, math, or auto by the rows' fields). `usable_prompts` and `held_out` give the
prompts a run uses and the held-out draw that raft.py and eval.py share. Every file and stage directory is written
aside, fsynced and renamed. Sampling, scoring and training are other files' work. Imports no kit module.
"""

import dataclasses
import functools
import json
import os
import re
import shutil

import torch

FORMATS = ("auto", "hh", "raw", "gsm8k", "math")
PROBLEM_FIELD = {"gsm8k": "question", "math": "problem"}  # the problem's field in GSM8K and MATH-500 rows
# {question} becomes the problem's text; every other character, braces included, is kept as written
PROMPT_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."
HH_STOP = ["###Human", "Human:"]  # the next human turn: the paper stopped responses there
# a turn starts at the beginning or after a blank line (spaces allowed), with "Human:" or "Assistant:"
_CUE = re.compile(r"(?:^|\n\s*\n)\s*(Human|Assistant):")


def load_rows(dataset: str, split: str = "train"):
    """Rows (dicts) of a local .jsonl/.json file, or of a directory or HF dataset name via datasets.load_dataset."""
    if os.path.isfile(dataset):
        with open(dataset, encoding="utf-8") as f:
            text = f.read()
        if dataset.endswith(".jsonl"):
            rows = [_json_line(dataset, n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        else:
            rows = _json_line(dataset, None, text)
            if isinstance(rows, dict) and split not in rows:
                raise SystemExit(f"--dataset {dataset!r} has no split {split!r} (it has {sorted(rows)})")
            rows = rows[split] if isinstance(rows, dict) else rows
            if not isinstance(rows, list):
                raise SystemExit(
                    f"{dataset}: expected a list of objects (or an object of splits), got {type(rows).__name__}"
                )
    else:  # a directory of <split>.jsonl files loads exactly as a hub dataset does
        # NAME:CONFIG picks a dataset's configuration, e.g. openai/gsm8k:main
        name, config = dataset.rsplit(":", 1) if ":" in dataset and not os.path.exists(dataset) else (dataset, None)
        try:
            import datasets

            rows = datasets.load_dataset(name, config, split=split)
        except Exception as e:  # the hub or the name is wrong: say so in one line, not a deep traceback
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise SystemExit(f"--dataset {dataset!r} split {split!r}: not a local file and not loadable ({msg})")
    if not len(rows):
        raise SystemExit(f"--dataset {dataset!r} has no rows")
    return rows


def _json_line(path: str, n, text: str):
    """One JSON value, or a one-line error naming the file, the line and what is wrong."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {n}" if n else f"line {e.lineno}"
        raise SystemExit(f"{path} {where}: not valid JSON ({e.msg}); fix or remove that line")


def read_jsonl(path: str) -> list:
    """The rows of a .jsonl file, with one-line errors for malformed lines."""
    with open(path, encoding="utf-8") as f:
        return [_json_line(path, n, line) for n, line in enumerate(f, 1) if line.strip()]


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
    # the template may write BOS as text; where encoding adds BOS itself a second one would be out of distribution,
    # so it is cut there only (SmolLM2's BOS is the chat marker <|im_start|>, which encoding never adds)
    cut = _bos_prefix(tok) and text.startswith(tok.bos_token)
    return text[len(tok.bos_token) :] if cut else text


def dataset_response(text: str, fmt: str, chat_template: bool) -> str:
    """A response from the data in the form the policy writes it: stripped, and after the paper's `###Assistant:`
    cue with one leading space, as in the dataset; raw text as it is."""
    return text.strip() if chat_template else " " + text.strip() if fmt == "hh" else text


def stop_strings(fmt: str, stop: list[str]) -> list[str]:
    """--stop, or for HH conversations without one the next human turn (the paper cut responses there)."""
    return list(stop) or (list(HH_STOP) if fmt == "hh" else [])


def resolve_format(prompt_format: str, rows) -> str:
    """auto -> hh for rows in the HH-RLHF schema (chosen and rejected beside the prompt), gsm8k for GSM8K's
    (question, and an answer with `####`), math for MATH-500's (problem and answer), else raw."""
    if prompt_format != "auto":
        return prompt_format
    first = rows[0] if isinstance(rows[0], dict) else {}
    if {"chosen", "rejected"} <= set(first):
        return "hh"
    if "question" in first and "####" in str(first.get("answer", "")):
        return "gsm8k"
    return "math" if {"problem", "answer"} <= set(first) else "raw"


def row_columns(row: dict, field: str) -> dict:
    """The row's fields other than the prompt's that a reward may take: strings and numbers."""
    return {k: v for k, v in row.items() if k != field and isinstance(v, (str, int, float))}


def gold_answer(row: dict, fmt: str):
    """The final answer of a GSM8K row (after `####`, without thousands commas) or a MATH row (its `answer`), or None
    if the row has none."""
    answer = row.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or (fmt == "gsm8k" and "####" not in answer):
        return None
    return (answer.split("####")[-1].strip().replace(",", "") if fmt == "gsm8k" else answer.strip()) or None


def format_prompts(
    rows,
    field: str = "prompt",
    prompt_format: str = "auto",
    tok=None,
    chat_template: bool = False,
    responses=(),
    name: str = "--dataset",
    template: str = PROMPT_TEMPLATE,
) -> tuple[list[dict], str]:
    """(records, resolved format): per usable row {row, prompt, reward_prompt, columns, <response fields>}, and for
    gsm8k and math the gold `answer`. hh rows with no human text or a blank response are skipped (the caller counts
    len(rows) - len(records)). Raises SystemExit with a one-line reason: a bad row, no usable row, a `template`
    without {question}, or --chat_template with a tokenizer that has none."""
    fmt = resolve_format(prompt_format, rows)
    if fmt in PROBLEM_FIELD:
        field = PROBLEM_FIELD[fmt] if field == "prompt" else field  # a --prompt_field given by name wins
        if "{question}" not in template:
            raise SystemExit(f"--prompt_template {template!r} has no {{question}}, where the problem goes; add it")
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
            f for f in (field, *responses) if not isinstance(row.get(f), str) or (fmt != "hh" and not row[f].strip())
        ]
        if bad:
            flag = "--prompt_field" if bad[0] == field else "--sft_field"
            raise SystemExit(
                f"{name} {_where(name, i)}: field {bad[0]!r} is missing, not a string, or empty (got "
                f"{row.get(bad[0])!r}); fix the row or pass {flag}"
            )
        columns = row_columns(row, field)
        if fmt in PROBLEM_FIELD:
            columns["answer"] = gold_answer(row, fmt)
            if columns["answer"] is None:
                need = "a string ending in '#### <final answer>'" if fmt == "gsm8k" else "the final answer"
                raise SystemExit(f"{name} {_where(name, i)}: field 'answer' must be {need} (got "
                                 f"{row.get('answer')!r}); fix the row or use --prompt_format raw")  # fmt: skip
            reward_prompt = template.replace("{question}", value.strip())
            turns = [("Human", reward_prompt)]
        elif fmt == "raw":
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
            "columns": columns,
        }
        if fmt in PROBLEM_FIELD:
            rec["answer"] = columns["answer"]
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
    template: str = PROMPT_TEMPLATE,
) -> tuple[list[dict], str, int]:
    """format_prompts(load_rows(dataset, split), ...) -> (records, resolved format, rows skipped)."""
    rows = load_rows(dataset, split)
    name = dataset if os.path.isfile(dataset) else f"--dataset {dataset}"
    records, fmt = format_prompts(rows, field, prompt_format, tok, chat_template, responses, name, template)
    return records, fmt, len(rows) - len(records)


def _where(name: str, i: int) -> str:
    """Where row i stands: its line in a .jsonl file (blank lines are skipped when reading), else its index."""
    if name.endswith(".jsonl") and os.path.isfile(name):
        with open(name, encoding="utf-8") as f:
            lines = [n for n, line in enumerate(f, 1) if line.strip()]
        return f"line {lines[i]}"
    return f"row {i}"


# ---- text to token ids ---------------------------------------------------------------------------------------
@functools.cache
def _bos_prefix(tok) -> tuple:
    """(BOS,) when the tokenizer puts BOS in front of a text, else (): asked once per tokenizer."""
    lead = tok("", add_special_tokens=True)["input_ids"]
    return (tok.bos_token_id,) if tok.bos_token_id is not None and lead[:1] == [tok.bos_token_id] else ()


def encode_prompt(tok, text: str) -> list[int]:
    """Prompt ids with the tokenizer's leading BOS but never a trailing EOS (T5-style tokenizers add one)."""
    return list(_bos_prefix(tok)) + tok(text, add_special_tokens=False)["input_ids"]


def encode_pair(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a pair from a dataset, encoded as one text so the response gets the tokens a
    model would generate after this prompt; if a token merged across the boundary, the response alone."""
    p, both = encode_prompt(tok, prompt), encode_prompt(tok, prompt + response)
    return (p, both[len(p) :]) if both[: len(p)] == p else (p, tok(response, add_special_tokens=False)["input_ids"])


# ---- which prompts a run uses ----------------------------------------------------------------------------------
def usable_prompts(cfg, tok, context, split, responses=(), unique=True, log=print) -> tuple[list[dict], str]:
    """Records of `split` whose prompt fits --max_prompt_tokens and the context with --max_new_tokens to spare;
    without duplicate prompts for RAFT's prompt sets (unique), every row for SFT pairs. Also the resolved format."""
    template = getattr(cfg, "prompt_template", PROMPT_TEMPLATE)  # eval.py's options have none: the default
    records, fmt, skipped = load_prompts(
        cfg.dataset, split, cfg.prompt_field, cfg.prompt_format, tok, cfg.chat_template, responses, template
    )
    if skipped:
        log(f"{cfg.dataset} {split}: skipped {skipped} rows with no human text or an empty response")
    if unique:
        n = len(records)
        records = list({r["prompt"]: r for r in records}.values())
        if len(records) < n:
            log(f"dropped {n - len(records)} duplicate prompts")
    limit = min(cfg.max_prompt_tokens, context - cfg.max_new_tokens)
    kept = [r for r in records if len(encode_prompt(tok, r["prompt"])) <= limit]
    if len(kept) < len(records):
        log(
            f"dropped {len(records) - len(kept)} of {len(records)} prompts longer than {limit} tokens "
            f"(--max_prompt_tokens, or the model's context minus --max_new_tokens)"
        )
    return kept, fmt


def held_out(records: list, n: int, seed: int) -> tuple[list, list]:
    """n records drawn by seed, and the rest in the same shuffled order: raft.py's and eval.py's held-out prompts."""
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    return [records[i] for i in order[:n]], [records[i] for i in order[n:]]


def stage_prompts(n: int, b: int, t: int, seed: int) -> tuple[list[int], bool]:
    """Indices of stage t's b prompts: positions (t-1)·b … t·b-1 of an endless stream of passes over the n prompts,
    pass e shuffled with seed + e, and whether a new pass began. From (seed, t) alone: a resumed run needs no state."""
    perms, idx, new_pass = {}, [], False
    for pos in range((t - 1) * b, t * b):
        e, k = divmod(pos, n)
        if e not in perms:
            perms[e] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)).tolist()
        new_pass |= k == 0 and pos > 0
        idx.append(perms[e][k])
    return idx, new_pass


def split_prompts(cfg, tok, context: int, log=print):
    """(training, held-out) records: --eval_prompts drawn by --seed from --eval_split or out of the training set;
    and the resolved --prompt_format."""
    train, fmt = usable_prompts(cfg, tok, context, cfg.dataset_split, log=log)
    held = usable_prompts(cfg, tok, context, cfg.eval_split, log=log)[0] if cfg.eval_split else train
    if len(held) < cfg.eval_prompts + (0 if cfg.eval_split else cfg.prompts_per_stage) or len(train) < 1:
        raise SystemExit(f"--dataset has {len(train)} usable prompts after dropping duplicates and over-long ones "
                         f"({len(held)} held-out), too few for --eval_prompts {cfg.eval_prompts} and "
                         f"--prompts_per_stage {cfg.prompts_per_stage}; lower them or add prompts")  # fmt: skip
    eval_r, rest = held_out(held, cfg.eval_prompts, cfg.seed)
    return (train if cfg.eval_split else rest), eval_r, fmt


# ---- the run directory ---------------------------------------------------------------------------------------
# Everything is written aside, fsynced, renamed into place and its directory fsynced: after a crash or a power cut
# a file or stage directory that exists is complete.
def _fsync(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str):
    """Every file under path, then every directory (the names in it), deepest first."""
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


def _replace(tmp: str, final: str):
    """Rename a complete, fsynced tmp into place and make the rename itself durable."""
    os.replace(tmp, final)
    _fsync(os.path.dirname(os.path.abspath(final)))


def write_text(path, text: str):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    _replace(tmp, path)


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
        with open(cfg_path, encoding="utf-8") as f:
            old = _json_line(cfg_path, None, f.read())
        diff = [k for k in saved if k not in ("resume", "resume_force", "stages") and old.get(k) != saved[k]]
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


def save_stage(out_dir, t, metrics, rows=None, eval_rows=None, model=None, tok=None, after_model=None, state_dict=None,
               extra=None):  # fmt: skip
    """Write stage_{t:04d}/ aside and rename it in place, so a directory that exists is complete. after_model() runs
    once the model is written, before the rename (raft.py's crash test hook). state_dict: the full weights of a
    sharded (FSDP2) model, gathered by the caller; extra: name -> object saved with torch.save (an optimizer state)."""
    final = os.path.join(out_dir, f"stage_{t:04d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if model is not None:
        model.save_pretrained(tmp, state_dict=state_dict)
        tok.save_pretrained(tmp)
        for name, obj in (extra or {}).items():
            torch.save(obj, os.path.join(tmp, name))
        if after_model:
            after_model()
    if rows is not None:
        write_jsonl(os.path.join(tmp, "selected.jsonl"), rows)
    write_jsonl(os.path.join(tmp, "eval_samples.jsonl"), eval_rows or [])
    write_text(os.path.join(tmp, "metrics.json"), json.dumps(metrics))
    _fsync_tree(tmp)
    _replace(tmp, final)


def save_model_dir(out, model, tok, state_dict=None, files=None):
    """A model and tokenizer (plus `files`, name -> text) written to out + ".tmp" and renamed to `out`. A model
    already at `out` is moved aside first and deleted last, so one complete model exists at every moment."""
    out = out.rstrip("/")
    tmp, old = out + ".tmp", out + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    tok.save_pretrained(tmp)
    for name, text in (files or {}).items():
        write_text(os.path.join(tmp, name), text)
    _fsync_tree(tmp)
    if os.path.exists(out):
        shutil.rmtree(old, ignore_errors=True)
        _replace(out, old)  # os.replace needs the name free; the old model stays whole beside it
    _replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def completed_stages(out_dir) -> list[int]:
    return sorted(int(d[6:]) for d in os.listdir(out_dir) if re.fullmatch(r"stage_\d{4}", d))


def prune_models(out_dir, keep_last: int):
    """--keep_last: delete the model files of all but the last N completed stages (metrics and kept sets stay)."""
    stages = [t for t in completed_stages(out_dir) if t > 0]
    for t in stages[:-keep_last] if keep_last else []:
        d = os.path.join(out_dir, f"stage_{t:04d}")
        for name in os.listdir(d):
            if name not in ("metrics.json", "selected.jsonl", "eval_samples.jsonl"):
                os.remove(os.path.join(d, name))


def write_metrics(out_dir, stages):
    """metrics.jsonl rebuilt from the completed stage directories; returns its rows."""
    rows = []
    for t in stages:
        path = os.path.join(out_dir, f"stage_{t:04d}", "metrics.json")
        with open(path, encoding="utf-8") as f:
            rows.append(_json_line(path, None, f.read()))
    write_jsonl(os.path.join(out_dir, "metrics.jsonl"), rows)
    return rows
