"""arith.py, the arithmetic demo's pieces: gold answers, the noise rate and kind, answer extraction, the reward,
pass@k, and a tokenizer that round-trips and survives save/load."""

import random
from collections import Counter

import pytest

import arith


def test_problems_distinct_seeded_and_correct():
    probs = arith.problems(2000, seed=3)
    assert len({p["prompt"] for p in probs}) == 2000
    assert probs == arith.problems(2000, seed=3) and probs != arith.problems(2000, seed=4)
    for p in probs:
        a, b = p["prompt"].removesuffix("=").split("+")
        assert 0 <= int(a) <= 99 and 0 <= int(b) <= 99
        assert p["answer"] == str(int(a) + int(b))
    # every problem of a small range, none twice; asking for more than exist is an error, not an endless loop
    assert len({p["prompt"] for p in arith.problems(16, seed=0, hi=3)}) == 16
    with pytest.raises(ValueError):
        arith.problems(17, seed=0, hi=3)


def test_noise_rate_and_slips():
    rng = random.Random(0)
    n = 20_000
    outs = [arith.noisy_answer("50", 0.6, rng) for _ in range(n)]
    wrong = [int(o) - 50 for o in outs if o != "50"]
    assert abs(len(wrong) / n - 0.6) < 0.015  # binomial sd ≈ 0.0035
    counts = Counter(wrong)
    assert set(counts) == set(arith.OFFSETS)
    assert all(abs(c / len(wrong) - 1 / len(arith.OFFSETS)) < 0.02 for c in counts.values())
    # the right answer stays the most likely one: what RAFT's samples must contain to sharpen onto
    assert Counter(outs).most_common(1)[0][0] == "50"
    assert all(arith.noisy_answer("7", 0.0, rng) == "7" for _ in range(100))
    assert all(arith.noisy_answer("7", 1.0, rng) != "7" for _ in range(100))
    # no negative answers: 0 can only slip upwards
    assert {arith.noisy_answer("0", 1.0, rng) for _ in range(200)} == {"1", "10"}


def test_pretraining_examples_follow_the_problems():
    probs = arith.problems(50, seed=1)
    gold = {p["prompt"]: p["answer"] for p in probs}
    ex = arith.pretraining_examples(5000, probs, seed=2, p_wrong=0.3)
    assert ex == arith.pretraining_examples(5000, probs, seed=2, p_wrong=0.3)
    assert {e["prompt"] for e in ex} == set(gold)  # only the given prompts (e.g. never the held-out ones)
    rate = sum(e["response"] != gold[e["prompt"]] for e in ex) / len(ex)
    assert abs(rate - 0.3) < 0.03
    assert all(abs(int(e["response"]) - int(gold[e["prompt"]])) in (0, 1, 10) for e in ex)


@pytest.mark.parametrize(
    "response, answer",
    [
        ("82", "82"),
        (" 82 ", "82"),
        ("082", "82"),
        ("answer: 82", "82"),
        ("30+40+7+5=70+12=82", "82"),
        ("8 2", "2"),  # the last number is the answer, not a concatenation of digits
        ("-3", "-3"),
        ("", None),
        ("abc", None),
        ("=", None),
    ],
)
def test_extract_answer(response, answer):
    assert arith.extract_answer(response) == answer


def test_reward():
    prompts = ["37+45=", "37+45=", "37+45=", "0+0=", "hello"]
    responses = ["82", "81", "", "0", "0"]
    assert arith.reward(prompts, responses) == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert arith.gold_answer("99+99=") == "198" and arith.gold_answer("9-9=") is None


def test_pass_at_k():
    assert arith.pass_at_k(16, 0, 8) == 0.0
    assert arith.pass_at_k(16, 9, 8) == 1.0  # 7 wrong samples cannot fill 8 draws
    assert arith.pass_at_k(16, 4, 1) == pytest.approx(4 / 16)  # pass@1 is the fraction correct
    assert arith.pass_at_k(2, 1, 2) == 1.0
    assert arith.pass_at_k(16, 1, 8) == pytest.approx(0.5)  # the one correct sample is in half of the 8-subsets
    with pytest.raises(ValueError):
        arith.pass_at_k(4, 1, 8)


def test_tokenizer_round_trip_and_save_load(tmp_path):
    from transformers import AutoTokenizer

    tok = arith.tokenizer()
    text = "37+45=82"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + len(text)  # BOS, then one token per character
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok(text, add_special_tokens=False)["input_ids"] == ids[1:]
    assert tok.unk_token_id in tok("#", add_special_tokens=False)["input_ids"]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids and again.eos_token_id == tok.eos_token_id
    assert again.pad_token_id == tok.pad_token_id != tok.eos_token_id


def test_model_config_builds_a_tiny_llama():
    import torch
    from transformers import LlamaForCausalLM

    tok = arith.tokenizer()
    cfg = arith.model_config(tok)
    model = LlamaForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    # the longest prompt plus max_new_tokens fits the context
    assert len(tok("99+99=")["input_ids"]) + arith.RAFT_DEMO["max_new_tokens"] <= cfg.max_position_embeddings
    logits = model(torch.tensor([tok("1+1=")["input_ids"]])).logits
    assert logits.shape == (1, 5, len(tok))
