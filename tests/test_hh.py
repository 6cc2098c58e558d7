"""The paper's pipeline: HH-RLHF rows in the Dahoas schema (tests/fixtures/hh_rlhf.jsonl: multi-turn, too long, an
empty conversation, odd spacing), prompt formats, stopping at the next human turn, the SFT starting point, reward
models and weighted rewards, metrics.py's text metrics, eval.py's perplexity and table; and SFT -> RAFT -> eval end
to end, offline."""

import json
import math
import os
import re

import pytest
import torch
from conftest import docs_text, make_tiny_rm
from transformers import AutoModelForCausalLM, AutoTokenizer, ByT5Tokenizer

import eval as ev
import metrics
import raft
import sampling
import sft
from data import encode_pair, encode_prompt, format_prompts, load_rows, stop_strings
from demo import train_demo_tokenizer
from reward import load_reward, load_rewards
from sampling import cut_response

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "hh_rlhf.jsonl")
LETTERS, LENGTH = f"{HERE}/rewards.py:letters", f"{HERE}/rewards.py:length"
CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SMALL = ["--max_new_tokens", "16", "--train_batch_size", "4", "--micro_batch_size", "4", "--device", "cpu"]


def paper_text(prompt):
    """How the paper's reward model saw HH-RLHF: the cues replaced by ###Human / ###Assistant."""
    return prompt.replace("\n\nHuman", "###Human").replace("\n\nAssistant", "###Assistant")


def test_hh_rows_become_the_papers_text():
    rows = load_rows(FIXTURE)
    records, fmt = format_prompts(rows, responses=("chosen",))
    assert fmt == "hh"  # auto: the rows carry chosen and rejected
    by_row = {r["row"]: r for r in records}
    for i in (0, 1, 2, 8, 11):  # ordinary rows, single- and multi-turn
        assert by_row[i]["prompt"] == by_row[i]["reward_prompt"] == paper_text(rows[i]["prompt"])
    assert by_row[2]["prompt"].count("###Human: ") == 3 and by_row[2]["prompt"].endswith("2?###Assistant:")
    assert by_row[3]["prompt"] == "###Human: What is   a good name for a cat?###Assistant:"  # spacing normalised
    assert by_row[3]["chosen"] == " How about Milo or Luna?"  # stripped, one space after the cue, as the dataset
    assert 5 not in by_row and len(records) == len(rows) - 1  # the empty conversation is skipped, not an error
    raw, fmt = format_prompts(rows, prompt_format="raw")
    assert fmt == "raw" and raw[1]["prompt"] == rows[1]["prompt"] and len(raw) == len(rows)
    assert format_prompts([{"prompt": "Q: hi A:"}])[1] == "raw"  # a plain prompt file stays raw


def test_chat_template_for_the_policy_paper_text_for_the_reward():
    tok = ByT5Tokenizer()
    tok.chat_template = CHAT
    records, _ = format_prompts(load_rows(FIXTURE), tok=tok, chat_template=True, responses=("chosen",))
    r = next(r for r in records if r["row"] == 1)
    assert r["prompt"] == (
        "<|user|>How do I boil an egg?\n<|assistant|>Put it in boiling water.\n<|user|>For how long?\n<|assistant|>"
    )
    assert (
        r["reward_prompt"] == "###Human: How do I boil an egg?###Assistant: Put it in boiling water."
        "###Human: For how long?###Assistant:"
    )
    assert r["chosen"] == "About nine minutes for a hard-boiled egg."
    with pytest.raises(SystemExit, match="--chat_template"):
        format_prompts(load_rows(FIXTURE), tok=ByT5Tokenizer(), chat_template=True)


def test_chat_prompt_cuts_a_leading_bos_only_where_encoding_adds_one():
    """A template that writes BOS as text: where encoding adds BOS itself the text's copy is cut (else the prompt
    would start with two); where encoding adds none (SmolLM2: BOS is the chat marker <|im_start|>) it stays, so
    the encoded prompt begins with BOS exactly once either way."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    adds = train_demo_tokenizer(["how do i boil an egg"] * 20)  # puts <s> in front of every text
    words = {w: i for i, w in enumerate(["<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "hi", "there"])}
    plain = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    plain.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    plain = PreTrainedTokenizerFast(tokenizer_object=plain, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    for tok, kept in ((adds, False), (plain, True)):
        tok.chat_template = "{{ bos_token }}" + CHAT
        prompt = format_prompts([{"prompt": "hi there"}], prompt_format="raw", tok=tok, chat_template=True)[0][0]
        assert prompt["prompt"].startswith("<s>") == kept, prompt["prompt"]
        assert prompt["prompt"].endswith("<|assistant|>")
        ids = encode_prompt(tok, prompt["prompt"])
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1, ids


def test_malformed_rows_are_one_line_errors():
    rows = load_rows(FIXTURE)[:2]
    rows[1] = {**rows[1], "chosen": None}
    with pytest.raises(SystemExit, match=r"row 1: field 'chosen' .*--sft_field"):
        format_prompts(rows, responses=("chosen",))
    with pytest.raises(SystemExit, match="no usable rows"):
        format_prompts([{"prompt": "\n\nHuman:  \n\nAssistant:", "chosen": "x", "rejected": "y"}])


def test_responses_stop_at_the_next_human_turn():
    tok = ByT5Tokenizer()
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    stop = stop_strings("hh", [])
    r = cut_response(enc(" Nine minutes.###Human: thanks###Assistant: you"), tok, {1}, stop)
    assert r["text"] == " Nine minutes." and r["end_id"] == 1  # ended by itself: EOS is trained
    r = cut_response(enc(" Sure.\n\nHuman: and more"), tok, {1}, stop)
    assert r["text"] == " Sure.\n\n"
    assert stop_strings("raw", []) == [] and stop_strings("hh", ["END"]) == ["END"]


def test_encode_pair_gives_the_tokens_a_model_generates_after_the_prompt():
    tok = train_demo_tokenizer(["i watched this movie and the acting was great"] * 50)
    p, r = encode_pair(tok, "i watched this", " movie and")
    assert p == encode_prompt(tok, "i watched this") and p + r == encode_prompt(tok, "i watched this movie and")
    p, r = encode_pair(tok, "the act", "ing was great")  # "acting" is one token: the boundary falls inside it
    assert p == encode_prompt(tok, "the act") and tok.decode(r) == "ing was great"


def test_text_metrics_by_hand():
    assert metrics.tokenize("Don't STOP!!") == ["don", "'", "t", "stop", "!", "!"]
    toks = [metrics.tokenize("a a b"), metrics.tokenize("c b d")]
    # unigrams a×2 b×2 c d: 6 tokens, 4 distinct, 2 seen once; bigrams (a,a) (a,b) | (c,b) (b,d): none crosses
    assert metrics.distinct_n(toks, 1) == pytest.approx(4 / 6) and metrics.unique_n(toks, 1) == 2
    assert metrics.distinct_n(toks, 2) == 1.0 and metrics.unique_n(toks, 2) == 4
    words = [[f"w{i}" for i in range(100)], ["x"] * 100, [f"y{i}" for i in range(50)]]
    # segments: 100 types / 100 = 1.0, then 1 / 100 = 0.01; the last 50 tokens are not a full segment: dropped
    assert metrics.msttr(words) == pytest.approx((1.0 + 0.01) / 2)
    assert metrics.msttr([["a"] * 99]) == 0.0
    m = metrics.text_metrics(["The cat.", "A dog barks"])
    assert m["mean_length"] == 3.0 and m["unique_1"] == 6


def test_perplexity_counts_the_response_and_eos_tokens_only(tiny_lm):
    """eval.perplexity of a random model = exp(mean NLL over the response tokens and the EOS after each, given the
    prompt), from a plain forward of each (prompt, response, EOS) alone; prompt tokens are not counted."""
    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    prompts = ["###Human: hi###Assistant:", "x", "a longer prompt than the others"]
    responses = [" hello", " a longer one", "!"]
    nll, n = 0.0, 0
    for p, r in zip(prompts, responses):
        x = tok(p, add_special_tokens=False)["input_ids"]  # ByT5: one token per byte, so prompt + response splits
        y = tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = model(torch.tensor([x + y])).logits[0].log_softmax(-1)
        nll -= sum(logp[len(x) - 1 + j, t].item() for j, t in enumerate(y))
        n += len(y)
    assert ev.perplexity(model, tok, prompts, responses) == pytest.approx(math.exp(nll / n), rel=1e-4)
    torch.nn.init.zeros_(model.lm_head.weight)  # and a uniform model: every next token has probability 1/V
    assert ev.perplexity(model, tok, prompts, responses) == pytest.approx(model.config.vocab_size, rel=1e-4)


def test_reward_model_sorted_batches_truncation_and_offload(tmp_path):
    rm = make_tiny_rm(tmp_path / "rm", max_positions=64)
    fn = load_reward(rm, batch_size=2)
    prompts = ["###Human: hi###Assistant:", "###Human: a much longer question here?###Assistant:", "q", "long " * 20]
    responses = [" hello", " short", " a response that is rather long", " x"]
    batched = fn(prompts, responses)
    assert fn.truncated == 1  # the 100+ byte text, cut to 64 tokens
    alone = [fn([p], [r])[0] for p, r in zip(prompts, responses)]
    assert batched == pytest.approx(alone, abs=1e-5) and len({round(v, 5) for v in batched}) == 4
    assert fn(prompts[:1], ["  hello  "]) == pytest.approx(batched[:1])  # the template decides the spacing
    # cut from the left: texts that differ only far before their end score the same; the response counts
    head = [c * 40 + "-" * 60 + "###Human: q###Assistant:" for c in "ab"]  # the last 64 bytes are equal
    same = fn(head, [" yes", " yes"])
    assert same[0] == pytest.approx(same[1], abs=1e-6) and fn(head[:1], [" no"])[0] != pytest.approx(same[0])
    assert load_reward(rm, batch_size=2, offload=True)(prompts, responses) == pytest.approx(batched, abs=1e-5)


def test_several_rewards_are_weighted_and_each_logged():
    fn = load_rewards([LETTERS, LENGTH], "1,0.5")
    assert fn(["p", "p"], ["ab", "a1!"]) == pytest.approx([1 + 0.5 * 2, 1 / 3 + 0.5 * 3])
    assert fn.stats == pytest.approx({"reward_0_mean": (1 + 1 / 3) / 2, "reward_1_mean": 2.5})
    assert math.isnan(load_rewards([LETTERS, f"{HERE}/rewards.py:nan_for_odd"])(["p"] * 2, ["a", "b"])[1])
    with pytest.raises(SystemExit, match="--reward_weights"):
        load_rewards([LETTERS, LENGTH], "1")
    base = ["--model", "m", "--dataset", "d", "--reward_weights", "1,0.5"]
    assert raft.parse(base + ["--reward", "a", "--reward", "b"]).reward == ["a", "b"]
    assert raft.parse(base + ["--reward", "a", "b"]).reward == ["a", "b"]


def test_sft_learns_the_chosen_responses(tiny_lm, tmp_path):
    out = tmp_path / "sft"
    args = [
        "--model",
        tiny_lm,
        "--dataset",
        FIXTURE,
        "--out_dir",
        str(out),
        "--epochs",
        "3",
        "--lr",
        "3e-3",
        *SMALL,
    ]
    loss = sft.main(args)
    assert sorted(os.listdir(tmp_path)) == ["sft"]  # written aside and renamed: no .tmp left
    info = json.loads((out / "sft.json").read_text())
    assert info["n_examples"] == 10 and info["sft_loss"] == pytest.approx(loss)  # 12 rows - empty - too long
    records = [r for r in format_prompts(load_rows(FIXTURE), responses=("chosen",))[0] if r["row"] != 4]
    tok = AutoTokenizer.from_pretrained(out)
    ppl = [
        ev.perplexity(
            AutoModelForCausalLM.from_pretrained(m), tok, [r["prompt"] for r in records], [r["chosen"] for r in records]
        )
        for m in (tiny_lm, out)
    ]
    assert ppl[1] < 0.7 * ppl[0], ppl
    with pytest.raises(SystemExit, match="not empty"):
        sft.main(args)


def test_eval_split_from_a_directory_of_splits(tiny_lm, tmp_path):
    rows = load_rows(FIXTURE)
    (tmp_path / "hh").mkdir()
    for name, part in [("train", rows[:9]), ("test", rows[9:])]:
        (tmp_path / "hh" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    raft.main(
        [
            "--model",
            tiny_lm,
            "--dataset",
            str(tmp_path / "hh"),
            "--eval_split",
            "test",
            "--eval_prompts",
            "3",
            "--reward",
            LETTERS,
            "--prompts_per_stage",
            "4",
            "--K",
            "2",
            "--stages",
            "1",
            "--out_dir",
            str(tmp_path / "run"),
            *SMALL,
        ]
    )
    ev_prompts = {json.loads(line)["prompt"] for line in open(tmp_path / "run" / "stage_0001" / "eval_samples.jsonl")}
    kept = {json.loads(line)["prompt"] for line in open(tmp_path / "run" / "stage_0001" / "selected.jsonl")}
    assert ev_prompts == {r["prompt"] for r in format_prompts(rows[9:])[0]}
    assert kept <= {r["prompt"] for r in format_prompts(rows[:9])[0]}
    with pytest.raises(SystemExit, match="--eval_split: a .jsonl file is one split"):
        raft.main(["--model", tiny_lm, "--dataset", FIXTURE, "--eval_split", "test", "--reward", LETTERS])


def test_pipeline_sft_raft_eval_table(tiny_lm, tmp_path, monkeypatch):
    """SFT from chosen -> RAFT 2 stages (a reward model + a callable, weighted) -> eval.py of base, SFT, RAFT."""
    rm = make_tiny_rm(tmp_path / "rm", max_positions=100)
    sft_dir, run, out = tmp_path / "sft", tmp_path / "raft", tmp_path / "eval"
    sft.main(
        [
            "--model",
            tiny_lm,
            "--dataset",
            FIXTURE,
            "--out_dir",
            str(sft_dir),
            "--epochs",
            "3",
            "--lr",
            "3e-3",
            *SMALL,
        ]
    )
    stops, generate = [], sampling.generate
    monkeypatch.setattr(raft, "generate", lambda *a, **k: stops.append(a[4].stop) or generate(*a, **k))
    rewards = ["--reward", rm, "--reward", LETTERS, "--reward_weights", "1,0.5"]
    rows = raft.main(
        [
            "--model",
            str(sft_dir),
            "--dataset",
            FIXTURE,
            *rewards,
            "--prompts_per_stage",
            "4",
            "--K",
            "4",
            "--eval_prompts",
            "4",
            "--stages",
            "2",
            "--lr",
            "1e-3",
            "--out_dir",
            str(run),
            *SMALL,
        ]
    )
    assert stops and all(s == ["###Human", "Human:"] for s in stops)  # the next human turn ends a response
    assert [r["stage"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["reward_mean"] == pytest.approx(r["reward_0_mean"] + 0.5 * r["reward_1_mean"], abs=1e-5)
        assert "eval_reward_1_mean" in r and "reward_truncated" in r
    assert sum(r["eval_reward_truncated"] for r in rows) > 0  # texts over 100 bytes are cut and counted
    readme = docs_text()
    keys = {re.sub(r"_\d+_", "_<i>_", k) for r in rows for k in r}
    assert not [k for k in keys if f"`{k}`" not in readme], "metrics not in the docs"

    table = ev.main(
        [
            "--model",
            tiny_lm,
            "--model",
            str(sft_dir),
            "--model",
            str(run / "stage_0002"),
            "--dataset",
            FIXTURE,
            "--dataset_split",
            "train",
            *rewards,
            "--eval_prompts",
            "4",
            "--out_dir",
            str(out),
            "--max_new_tokens",
            "16",
            "--micro_batch_size",
            "4",
            "--device",
            "cpu",
        ]
    )
    saved = json.loads((out / "table.json").read_text())["rows"]
    names = [tiny_lm, str(sft_dir), str(run / "stage_0002"), "dataset chosen", "dataset rejected"]
    assert [r["model"] for r in saved] == [r["model"] for r in table] == names
    assert (out / "table.md").read_text().count("\n") == 2 + len(names)
    base, tuned = saved[0]["perplexity"], saved[1]["perplexity"]
    assert all(math.isfinite(r["perplexity"]) for r in saved[:3]) and saved[3]["perplexity"] is None
    assert tuned < base  # SFT on chosen lowers their perplexity
    assert all(r["n"] == 4 and 0 < r["distinct_1"] <= 1 and r["mean_length"] > 0 for r in saved)
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert len(samples) == 20 and saved[2]["reward_mean"] == pytest.approx(
        sum(s["reward"] for s in samples if s["model"] == names[2]) / 4
    )
    # same held-out prompts and random numbers as raft.py's per-stage eval: the stage-2 model scores the same
    assert saved[2]["reward_mean"] == pytest.approx(rows[2]["eval_reward_mean"], abs=1e-5)
    assert saved[2]["distinct_2"] == pytest.approx(rows[2]["eval_distinct_2"])


def test_eval_py_draws_exactly_raft_pys_held_out_prompts(tiny_lm, tmp_path):
    """With a duplicated prompt among 41, eval.py's held-out prompts are raft.py's, in the same order (both drop the
    duplicate before drawing; without that, only 2 of 8 matched)."""
    from conftest import tiny_args, write_prompts

    path = write_prompts(tmp_path / "p.jsonl", 40)
    lines = open(path).read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join([lines[0]] + lines) + "\n")  # 41 rows, one prompt twice
    raft.main(tiny_args(tiny_lm, path, tmp_path / "r", "--stages", "1", "--eval_prompts", "8"))
    held = [json.loads(line)["prompt"] for line in open(tmp_path / "r" / "stage_0000" / "eval_samples.jsonl")]
    ev.main(["--model", tiny_lm, "--dataset", path, "--dataset_split", "train", "--reward", LETTERS, "--eval_prompts",
             "8", "--max_new_tokens", "12", "--out_dir", str(tmp_path / "e"), "--device", "cpu"])  # fmt: skip
    picked = [json.loads(line)["prompt"] for line in open(tmp_path / "e" / "samples.jsonl")]
    assert len(held) == 8 and picked == held


def test_sft_keeps_every_pair_when_prompts_repeat(tiny_lm, tmp_path):
    """HH-RLHF has several responses per prompt: SFT learns all of them; only RAFT's prompt sets drop duplicates."""
    rows = [{"prompt": "Q: same question A:", "chosen": f" answer number {i}"} for i in range(6)]
    rows += [{"prompt": f"Q: other {i} A:", "chosen": " fine"} for i in range(2)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sft"
    sft.main(["--model", tiny_lm, "--dataset", str(path), "--out_dir", str(out), "--epochs", "1", *SMALL])
    assert json.loads((out / "sft.json").read_text())["n_examples"] == 8
