"""demo.py's arithmetic demo: gold answers, the noise rate and kind, pretraining pairs, and a tokenizer that round-trips
and survives save/load."""

import random
from collections import Counter

import pytest

import demo


def test_problems_distinct_seeded_and_correct():
    probs = demo.problems(2000, seed=3)
    assert len({p["prompt"] for p in probs}) == 2000
    assert probs == demo.problems(2000, seed=3) and probs != demo.problems(2000, seed=4)
    for p in probs:
        a, b = p["prompt"].removesuffix("=").split("+")
        assert 0 <= int(a) <= 99 and 0 <= int(b) <= 99
        assert p["answer"] == str(int(a) + int(b))
    # every problem of a small range, none twice; asking for more than exist is an error, not an endless loop
    assert len({p["prompt"] for p in demo.problems(16, seed=0, hi=3)}) == 16
    with pytest.raises(ValueError):
        demo.problems(17, seed=0, hi=3)


def test_noise_rate_and_slips():
    rng = random.Random(0)
    n = 20_000
    outs = [demo.noisy_answer("50", 0.6, rng) for _ in range(n)]
    wrong = [int(o) - 50 for o in outs if o != "50"]
    assert abs(len(wrong) / n - 0.6) < 0.015  # binomial sd ≈ 0.0035
    counts = Counter(wrong)
    assert set(counts) == set(demo.ARITH_OFFSETS)
    assert all(abs(c / len(wrong) - 1 / len(demo.ARITH_OFFSETS)) < 0.02 for c in counts.values())
    # the right answer stays the most likely one: what RAFT's samples must contain to sharpen onto
    assert Counter(outs).most_common(1)[0][0] == "50"
    assert all(demo.noisy_answer("7", 0.0, rng) == "7" for _ in range(100))
    assert all(demo.noisy_answer("7", 1.0, rng) != "7" for _ in range(100))
    # no negative answers: 0 can only slip upwards
    assert {demo.noisy_answer("0", 1.0, rng) for _ in range(200)} == {"1", "10"}


def test_pretraining_examples_follow_the_problems():
    probs = demo.problems(50, seed=1)
    gold = {p["prompt"]: p["answer"] for p in probs}
    ex = demo.pretraining_examples(5000, probs, seed=2, p_wrong=0.3)
    assert ex == demo.pretraining_examples(5000, probs, seed=2, p_wrong=0.3)
    assert {e["prompt"] for e in ex} == set(gold)  # only the given prompts (e.g. never the held-out ones)
    rate = sum(e["response"] != gold[e["prompt"]] for e in ex) / len(ex)
    assert abs(rate - 0.3) < 0.03
    assert all(abs(int(e["response"]) - int(gold[e["prompt"]])) in (0, 1, 10) for e in ex)


def test_tokenizer_round_trip_and_save_load(tmp_path):
    from transformers import AutoTokenizer

    tok = demo.char_tokenizer()
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

    tok = demo.char_tokenizer()
    cfg = demo.arithmetic_config(tok)
    model = LlamaForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    # the longest prompt plus max_new_tokens fits the context
    longest = len(tok("99+99=")["input_ids"]) + demo.SETTINGS["arithmetic"]["max_new_tokens"]
    assert longest <= cfg.max_position_embeddings
    logits = model(torch.tensor([tok("1+1=")["input_ids"]])).logits
    assert logits.shape == (1, 5, len(tok))


def test_worked_answers_mix_with_bare_ones():
    from math_reward import exact_number

    assert demo.worked_answer("37+45=", "82") == "12 7 82"
    assert demo.worked_answer("0+0=", "0") == "0 0 0"
    probs = demo.problems(200, seed=1)
    gold = {p["prompt"]: p["answer"] for p in probs}
    ex = demo.pretraining_examples(10_000, probs, seed=2, p_wrong=0.7, p_worked=0.3, p_wrong_worked=0.1)
    worked = [e for e in ex if " " in e["response"]]
    bare = [e for e in ex if " " not in e["response"]]
    assert abs(len(worked) / len(ex) - 0.3) < 0.03
    wrong = [e["response"] != demo.worked_answer(e["prompt"], gold[e["prompt"]]) for e in worked]
    assert abs(sum(wrong) / len(worked) - 0.1) < 0.03
    assert abs(sum(e["response"] != gold[e["prompt"]] for e in bare) / len(bare) - 0.7) < 0.03
    # the work stays right when the answer slips, and the reward reads the answer (the last number)
    for e in worked:
        assert e["response"].rsplit(" ", 1)[0] == demo.worked_answer(e["prompt"], "0").rsplit(" ", 1)[0]
    rewards = exact_number(
        [e["prompt"] for e in worked], [e["response"] for e in worked], [gold[e["prompt"]] for e in worked]
    )
    assert rewards == [float(not w) for w in wrong]
