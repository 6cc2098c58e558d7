"""RAFT for reasoning: GSM8K and MATH-500 rows (tests/fixtures, in the datasets' schemas) become templated prompts
with gold answers and columns; rewards take the columns they name; math_verify and exact_number check answers (in a
worker thread, bounded in time); pass@k, maj@n and eval.py --responses --pass_k."""

import itertools
import json
import math
import os
import threading
import time

import pytest
from transformers import ByT5Tokenizer

import eval as ev
import metrics as mt
import math_reward
from data import PROMPT_TEMPLATE, format_prompts, load_prompts, load_rows, resolve_format
from math_reward import exact_number, math_verify, verify_answers
from reward import load_rewards, reward_columns

HERE = os.path.dirname(os.path.abspath(__file__))
GSM8K, MATH500 = (os.path.join(HERE, "fixtures", f) for f in ("gsm8k.jsonl", "math500.jsonl"))


# rewards in the `f(prompts, responses, <columns>)` convention, loaded as test_reasoning:<name>
def same_answer(prompts, responses, answer):
    return [float(r == a) for r, a in zip(responses, answer)]


def with_level(prompts, responses, answer, *, level=None, missing_ok=0):
    return [float(lv) for lv in level]


def every_column(prompts, responses, **columns):
    every_column.seen = columns
    return [0.0] * len(prompts)


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


# ---- rewards that see the dataset's columns ------------------------------------------------------------------
def test_rewards_get_exactly_the_columns_they_name():
    columns = {"p1": {"answer": "4", "level": 1}, "p2": {"answer": "5", "level": 3}}
    fn = load_rewards(["test_reasoning:same_answer", "test_reasoning:with_level"], "1,10", columns=columns)
    assert fn(["p2", "p1"], ["5", "5"]) == [31.0, 10.0]  # each prompt's own answer and level, in the batch's order
    assert fn.columns == ["answer", "level"]
    fn = load_rewards(["test_reasoning:every_column"], columns=columns)
    fn(["p1"], ["x"])
    assert every_column.seen == {"answer": ["4"], "level": [1]} and fn.columns == ["answer", "level"]
    # keyed by the prompt the policy saw; the reward sees the prompt_view text
    fn = load_rewards(
        ["test_reasoning:same_answer"], columns={"<chat>q": {"answer": "4"}}, prompt_view={"<chat>q": "q"}
    )
    assert fn(["<chat>q"], ["4"]) == [1.0]
    fn = load_rewards(["test_reasoning:same_answer"], columns={"q": {"answer": "4"}}, prompt_view={"<chat>q": "q"})
    assert fn(["<chat>q"], ["4"]) == [1.0]  # or by the text the reward sees (eval.py scores that text)
    assert load_rewards(["reward:vader_sentiment"], columns=columns).columns == []
    assert reward_columns(lambda prompts, responses: [], "model", ["answer"]) == []  # a reward model's closure


def test_a_column_the_data_lacks_is_a_one_line_error():
    with pytest.raises(SystemExit) as e:
        load_rewards(["math_reward:math_verify"], columns={"p": {"solution": "s"}})
    msg = str(e.value)
    assert "math_reward:math_verify" in msg and "'answer'" in msg and "['solution']" in msg and "\n" not in msg
    with pytest.raises(SystemExit, match="'answer'"):
        load_rewards(["math_reward:exact_number"])  # no columns at all
    fn = load_rewards(["test_reasoning:same_answer"], columns={"p": {"answer": "4"}})
    with pytest.raises(SystemExit, match="test_reasoning:same_answer: no dataset columns for the prompt 'other'"):
        fn(["other"], ["4"])


def test_exact_number_reads_the_last_number_gsm8k_style():
    cases = [
        ("So she spends $15.", "15", 1.0),  # a trailing full stop is not a decimal point
        ("It has 1,800 books.", "1800", 1.0),  # thousands commas
        ("12 + 3 = 15, then 1,234,567", "1234567", 1.0),
        ("The change is -3", "-3", 1.0),
        ("5-3", "-3", 0.0),  # a minus after a number is subtraction
        ("It costs 3.50 dollars", "3.5", 1.0),
        ("It costs 3.5 dollars", "3.50", 1.0),
        ("first 15, then 16", "15", 0.0),  # the last number counts
        ("no number here", "15", 0.0),
        ("#### 72", "72", 1.0),
    ]
    assert exact_number([""] * len(cases), [c[0] for c in cases], [c[1] for c in cases]) == [c[2] for c in cases]
    with pytest.raises(SystemExit, match=r"math_reward:exact_number: the answer 'x\^2' is not a number"):
        exact_number(["p"], ["1"], ["x^2"])
    records = load_prompts(GSM8K)[0]  # every fixture row's worked answer ends in its gold answer
    assert exact_number([], [row["answer"] for row in load_rows(GSM8K)], [r["answer"] for r in records]) == [1.0] * 8


def test_math_verify_equal_answers_in_several_forms():
    cases = [
        (r"so the answer is \boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{0.5}", r"\frac12", 1.0),  # bare LaTeX gold, unboxed
        (r"\boxed{2x+1}", "1+2x", 1.0),  # a bare expression: parse() alone would read the gold as 1
        (r"\boxed{1}", "1+2x", 0.0),
        (r"Thus $x = 3$.", "3", 1.0),
        (r"\boxed{3}", "x=3", 1.0),
        (r"\boxed{\dfrac{14}{3}}", r"\frac{14}{3}", 1.0),
        (r"\boxed{\frac{1}{3}}", "0.5", 0.0),
        ("I do not know.", "7", 0.0),
        ("", "7", 0.0),
    ]
    assert math_verify([""] * len(cases), [c[0] for c in cases], answer=[c[1] for c in cases]) == [c[2] for c in cases]
    rows, records = load_rows(MATH500), load_prompts(MATH500)[0]
    fn = load_rewards(["math_reward:math_verify"], columns={r["prompt"]: r["columns"] for r in records})
    prompts = [r["prompt"] for r in records]
    assert fn(prompts, [row["solution"] for row in rows]) == [1.0] * 8  # each fixture solution boxes its answer
    assert fn(prompts, [row["solution"] for row in rows[1:] + rows[:1]]) == [0.0] * 8  # another row's: wrong


def test_math_verify_works_in_a_thread_and_bounds_a_pathological_response(monkeypatch):
    verify_answers(["1", "2"], [r"\boxed{1}", r"\boxed{2}"])  # the checking processes start outside the clock
    started, start = [*math_reward._mv_idle], math_reward._mv_start
    monkeypatch.setattr(math_reward, "_mv_start", lambda: started.append(start()) or started[-1])
    monkeypatch.setattr(math_reward, "MATH_VERIFY_TIMEOUT", 2.0)
    out, took = [], []

    def work():  # sympy spins on the tower of powers: its response scores 0, the others are still checked
        t0 = time.monotonic()
        out.append(math_verify(["p"] * 3, [r"\boxed{9^{9^{9^{9^{9}}}}}", r"\boxed{4}", "5"], answer=["3", "4", "5"]))
        took.append(time.monotonic() - t0)

    worker = threading.Thread(target=work, daemon=True)
    try:
        worker.start()
        worker.join(60)  # a hang fails here instead of hanging the suite
        assert not worker.is_alive() and out == [[0.0, 1.0, 1.0]]
        assert took[0] < 12, took  # one 2 s deadline (plus a replacement process starting), not sympy's hours
        assert verify_answers(["6"], [r"\boxed{6}"]) == [1.0]  # the stuck process was replaced
        assert not [p for p in started if p.poll() is None and p not in math_reward._mv_idle]  # and killed, not left
    finally:
        for p in started:
            if p not in math_reward._mv_idle:
                p.kill()


# ---- pass@k and majority vote --------------------------------------------------------------------------------
def test_pass_at_k_by_hand_and_by_enumeration():
    assert mt.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert mt.pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert mt.pass_at_k(4, 1, 4) == 1.0 and mt.pass_at_k(4, 0, 4) == 0.0 and mt.pass_at_k(4, 4, 1) == 1.0
    assert mt.pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):  # the share of k-subsets of n samples that hold a correct one
                subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
                assert mt.pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets), abs=1e-12)
    assert 0 < mt.pass_at_k(2000, 3, 1000) < 1 and math.isfinite(mt.pass_at_k(2000, 3, 1000))  # no C(2000, 1000)
    with pytest.raises(SystemExit, match="pass@5"):
        mt.pass_at_k(4, 1, 5)


def rows_of(groups):
    """Rows of several responses per prompt: groups = {prompt: [(response, reward), ...]}."""
    return [{"prompt": p, "response": t, "reward": r} for p, rs in groups.items() for t, r in rs]


def test_pass_k_lists_are_checked_before_anything_loads(prompts_file):
    """--pass_k is comma-separated positive integers, each at most --eval_samples; raft.py checks it in parse()."""
    import raft

    assert mt.pass_ks("1,8") == [1, 8] and mt.pass_ks("") == []
    for bad in ["x", "0", "1,", "1,,8", "-1", "1.5"]:
        with pytest.raises(SystemExit, match="comma-separated positive integers"):
            mt.pass_ks(bad)
    base = ["--model", "m", "--dataset", prompts_file, "--reward", "r.py:f", "--pass_k", "1,8"]
    with pytest.raises(SystemExit, match="each k must be ≤ --eval_samples"):
        raft.parse([*base, "--eval_samples", "4"])
    assert raft.parse([*base, "--eval_samples", "8"]).pass_k == "1,8"


def test_pass_at_k_table_and_majority_vote_by_hand():
    rows = rows_of({
        "a": [(r"\boxed{4}", 1.0), (r"\boxed{5}", 0.0), (r"\boxed{5}", 0.0), ("so 4", 1.0)],  # tie: 4 came first
        "b": [(r"\boxed{7}", 0.0), ("7", 0.0), (r"\boxed{2}", 1.0), (r"\boxed{7}", 0.0)],  # vote 7: wrong
        "c": [("no idea", 0.0), ("none", float("nan")), ("?", 0.0), (r"\boxed{9}", 1.0)],  # one answer: 9, right
        "d": [("hmm", 0.0), ("no", 0.0), ("...", 0.0), ("?", 0.0)],  # nothing to vote on: wrong, still counted
    })  # fmt: skip
    t = mt.pass_at_k_table(rows, [1, 2, 4])
    # per prompt c = 2, 1, 1, 0 of n = 4: pass@1 = (0.5 + 0.25 + 0.25 + 0) / 4; pass@2 = (5/6 + 0.5 + 0.5 + 0) / 4
    assert t == pytest.approx({"pass@1": 0.25, "pass@2": (5 / 6 + 1) / 4, "pass@4": 0.75})
    assert mt.maj_at_n(rows) == pytest.approx(2 / 4)  # a and c right, b wrong, d (no answer at all) wrong
    assert mt.maj_at_n(rows_of({"d": [("no", 1.0)]})) == 0.0
    # equal answers written differently vote together: two spellings of 1/2 outvote the single 3
    split = rows_of({"e": [(r"\boxed{\dfrac{1}{2}}", 1.0), (r"\boxed{3}", 0.0), (r"so $\boxed{\frac {1}{2}}$.", 1.0)]})
    assert mt.maj_at_n(split) == 1.0
    assert mt.extract_answer(r"\boxed{\left( 1, 2 \right).}") == mt.extract_answer(r"\boxed{(1,2)}") == "(1,2)"
    with pytest.raises(SystemExit, match="--pass_k 4: a prompt has only 3"):
        mt.pass_at_k_table(rows[:-1], [1, 4])


def test_extract_answer():
    assert mt.extract_answer(r"first \boxed{1}, finally \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"  # the last box
    assert mt.extract_answer(r"\boxed{\left( 2, \frac{3 \pi}{2} \right)}") == r"(2,\frac{3\pi}{2})"  # one spelling
    assert mt.extract_answer(r"\boxed{1,000}") == mt.extract_answer("so 1000.0") == "1000"  # one spelling each
    assert mt.extract_answer(r"\boxed{2} and then \boxed{3") == "2"  # a box cut off mid-answer is not an answer
    assert mt.extract_answer("she pays $3.50.") == "3.5" and mt.extract_answer("it is -4") == "-4"
    assert mt.extract_answer("no answer") is None


def test_eval_responses_with_pass_k(tmp_path, capsys):
    f = tmp_path / "responses.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows_of({"a": [("4", 1.0), ("5", 0.0)], "b": [("1", 0.0)] * 2})))
    m = ev.main(["--responses", str(f), "--pass_k", "1,2"])
    assert m["pass@1"] == pytest.approx(0.25) and m["pass@2"] == pytest.approx(0.5) and m["maj@n"] == 0.5
    assert m["distinct_1"] > 0 and json.loads(capsys.readouterr().out) == m  # beside the text metrics, printed
    assert "pass@1" not in ev.main(["--responses", str(f)])  # without --pass_k: as before
    with pytest.raises(SystemExit, match="--pass_k 'one'"):
        ev.main(["--responses", str(f), "--pass_k", "one"])
    f.write_text(json.dumps({"response": "4"}) + "\n")
    with pytest.raises(SystemExit, match="line 1 needs a string `prompt` and a number `reward`"):
        ev.main(["--responses", str(f), "--pass_k", "1"])


def test_a_dataset_configuration_is_named_after_a_colon(monkeypatch):
    """`--dataset openai/gsm8k:main` loads the hub dataset openai/gsm8k in its configuration main."""
    import datasets

    import data

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or [{"question": "q"}])
    data.load_rows("openai/gsm8k:main", "train")
    data.load_rows("openai/gsm8k", "test")
    assert calls == [(("openai/gsm8k", "main"), {"split": "train"}), (("openai/gsm8k", None), {"split": "test"})]
