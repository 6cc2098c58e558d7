"""RAFT for reasoning: GSM8K and MATH-500 rows (tests/fixtures, in the datasets' schemas) become templated prompts
with gold answers and columns."""

import json
import os

import pytest
from transformers import ByT5Tokenizer

from data import PROMPT_TEMPLATE, format_prompts, load_prompts, load_rows, resolve_format

HERE = os.path.dirname(os.path.abspath(__file__))
GSM8K, MATH500 = (os.path.join(HERE, "fixtures", f) for f in ("gsm8k.jsonl", "math500.jsonl"))


# ---- data ----------------------------------------------------------------------------------------------------
def test_gsm8k_and_math500_rows_become_templated_prompts_with_gold_answers():
    records, fmt, skipped = load_prompts(GSM8K)
    assert fmt == "gsm8k" and skipped == 0 and len(records) == 8  # auto: question, and an answer with ####
    q = load_rows(GSM8K)[1]["question"]
    assert records[1]["prompt"] == records[1]["reward_prompt"] == PROMPT_TEMPLATE.replace("{question}", q)
    assert records[1]["prompt"].endswith("final answer within \\boxed{}.")  # braces kept, not str.format's
    assert records[1]["answer"] == "1800" and records[1]["columns"] == {"answer": "1800"}  # after ####, no comma
    assert [r["answer"] for r in records] == ["15", "1800", "41", "72", "40", "150", "16", "114"]

    records, fmt, _ = load_prompts(MATH500, template="Problem: {question}\nAnswer:")
    row = load_rows(MATH500)[3]
    assert fmt == "math" and records[3]["prompt"] == f"Problem: {row['problem']}\nAnswer:"
    assert records[3]["answer"] == "x^2 + 7x + 10"
    assert records[3]["columns"] == {k: v for k, v in row.items() if k != "problem"}  # solution, level, ...
    assert records[3]["columns"]["level"] == 2

    tok = ByT5Tokenizer()
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"
    r = format_prompts(load_rows(MATH500), tok=tok, chat_template=True)[0][0]
    assert r["prompt"] == f"<|user|>{r['reward_prompt']}<|assistant|>" and r["reward_prompt"].startswith("What is")

    raw = format_prompts([{"prompt": "Q", "answer": "7", "n": 3, "tags": ["x"], "extra": None}])[0][0]
    assert raw["columns"] == {"answer": "7", "n": 3} and "answer" not in raw  # raw: every string/number field
    assert resolve_format("auto", [{"question": "Q", "answer": "7"}]) == "raw"  # no ####: not GSM8K


def test_reasoning_rows_with_no_gold_answer_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = load_rows(GSM8K)[:2]
    rows[1]["answer"] = "the answer is 5"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match=r"line 2: field 'answer' must be .*####") as e:
        load_prompts(str(bad), prompt_format="gsm8k")
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="line 1: field 'problem'"):
        load_prompts(GSM8K, prompt_format="math")
    with pytest.raises(SystemExit, match=r"--prompt_template .* \{question\}"):
        load_prompts(GSM8K, template="Solve: {problem}")
