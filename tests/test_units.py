"""Unit tier: selection, the SFT batch (masks, EOS), response cutting and slicing, prompt order, text metrics."""

import math
import os

import pytest
import torch
from conftest import PlainSGD
from transformers import ByT5Tokenizer

import data
import dist
import losses
import models
import raft
import sampling
from metrics import distinct_n, msttr, score_samples, text_metrics, tokenize, unique_n
from models import build_example
from data import stage_prompts
from raft import Config, select
from sampling import cut_response

S = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3], [0.6, 0.8, 0.0]])
ALL = torch.ones(3, 3, dtype=torch.bool)


def test_local_keeps_argmax_per_prompt():
    assert select(S, ALL, "local", torch.Generator()) == [(0, 1), (1, 0), (2, 1)]


def test_global_keeps_top_b_of_all_samples():
    # b = 3 prompts -> the 3 best of 9: 0.9 (0,1), 0.8 (2,1), 0.7 (1,0)
    assert select(S, ALL, "global", torch.Generator()) == [(0, 1), (1, 0), (2, 1)]
    s = torch.tensor([[0.9, 0.8, 0.7], [0.1, 0.2, 0.3], [0.0, 0.0, 0.0]])
    assert select(s, ALL, "global", torch.Generator()) == [(0, 0), (0, 1), (0, 2)]  # may take several per prompt


def test_invalid_samples_are_never_kept_and_empty_prompts_skipped():
    valid = ALL.clone()
    valid[0, 1] = False  # the best of prompt 0 is invalid -> next best 0.5
    valid[1] = False  # nothing left for prompt 1 -> skipped
    assert select(S, valid, "local", torch.Generator()) == [(0, 2), (2, 1)]
    assert select(S, valid, "global", torch.Generator()) == [(0, 2), (2, 0), (2, 1)]
    for seed in range(20):
        keep = select(S, valid, "random", torch.Generator().manual_seed(seed))
        assert [i for i, _ in keep] == [0, 2] and all(valid[i, j] for i, j in keep)


def test_random_is_uniform_over_valid_samples():
    valid = torch.tensor([[True, False, True]])
    g = torch.Generator().manual_seed(0)
    picks = [select(torch.zeros(1, 3), valid, "random", g)[0][1] for _ in range(600)]
    assert set(picks) == {0, 2} and 240 < picks.count(0) < 360


def _samples(texts, rewards, log_ratios=None):
    tok = ByT5Tokenizer()
    return [
        [
            {
                "ids": tok(t, add_special_tokens=False)["input_ids"],
                "text": t,
                "end_id": tok.eos_token_id,
                "reward": float(r),
                **({"log_ratio": log_ratios[i][j]} if log_ratios else {}),
            }
            for j, (t, r) in enumerate(zip(row, rrow))
        ]
        for i, (row, rrow) in enumerate(zip(texts, rewards))
    ]


def _rank(texts, rewards, log_ratios=None, **cfg_kw):
    cfg = Config(K=len(texts[0]), **cfg_kw)
    rows, kept, m = raft.rank_samples(
        [f"p{i}" for i in range(len(texts))],
        _samples(texts, rewards, log_ratios),
        cfg,
        torch.Generator().manual_seed(0),
    )
    return rows, kept, m


def test_discard_regex_and_empty_responses():
    rows, kept, m = _rank(
        [["a # hack", "fine", ""], ["## x", "#", "ok"], ["", "#", "#"]],
        [[9, 1, 5], [9, 9, 2], [5, 5, 5]],
        discard_regex="#",
    )
    assert [(r["prompt"], r["response"]) for r in rows] == [("p0", "fine"), ("p1", "ok")]
    assert m["prompts_skipped"] == 1 and m["samples_discarded"] == 5 and m["samples_empty"] == 2
    assert rows[0]["rewards"] == [9, 1, 5] and rows[0]["reward"] == 1
    assert kept == [(0, 1, 1.0), (1, 2, 1.0)]  # (prompt, sample, advantage): the paper's weight 1


def test_nan_reward_excluded():
    tok = ByT5Tokenizer()
    samples = [
        [{"ids": [5], "text": "a", "end_id": 1}, {"ids": [6], "text": "b", "end_id": 1}],
        [{"ids": [7], "text": "c", "end_id": 1}, {"ids": [8], "text": "d", "end_id": 1}],
    ]
    score_samples(tok, ["p0", "p1"], samples, lambda p, r: [math.nan, 0.1, 0.5, math.inf])
    rows, _, m = raft.rank_samples(["p0", "p1"], samples, Config(K=2), torch.Generator())
    assert [r["response"] for r in rows] == ["b", "c"] and m["samples_nan_reward"] == 2


def test_kl_beta_changes_the_ranking():
    # rewards prefer sample 0, but the policy drifted far from p_0 on it (log-ratio 10) and not on sample 1 (0.5)
    rows, _, m = _rank([["x", "y"]], [[1.0, 0.8]], [[10.0, 0.5]], kl_beta=0.0)
    assert rows[0]["response"] == "x"
    rows, _, m = _rank([["x", "y"]], [[1.0, 0.8]], [[10.0, 0.5]], kl_beta=0.1)  # 1 - 0.1·10 = 0 < 0.8 - 0.05
    assert rows[0]["response"] == "y" and rows[0]["reward"] == pytest.approx(0.8)
    assert m["kl_to_start"] == pytest.approx((10 + 0.5) / 2)


def test_score_samples_computes_the_log_ratio():
    tok = ByT5Tokenizer()
    samples = [[{"ids": [5], "text": "a", "end_id": 1}, {"ids": [6, 7], "text": "bc", "end_id": None}]]
    seen = []
    kl = lambda ex: (seen.extend(ex), ([-1.0, -2.0], [-3.0, -1.0]))[1]
    score_samples(tok, ["p"], samples, lambda p, r: [0.0, 1.0], kl)
    assert [s["log_ratio"] for s in samples[0]] == [2.0, -1.0]
    p = data.encode_prompt(tok, "p")
    assert seen == [(p + [5, 1], [-100] * len(p) + [5, 1]), (p + [6, 7], [-100] * len(p) + [6, 7])]


def test_sft_example_masks_prompt_and_trains_eos_only_when_ended():
    x, y = build_example([5, 6, 7], [8, 9], end_id=1)
    assert x == [5, 6, 7, 8, 9, 1] and y == [-100, -100, -100, 8, 9, 1]
    x, y = build_example([5, 6, 7], [8, 9], end_id=None)  # cut at max_new_tokens: no EOS
    assert x == [5, 6, 7, 8, 9] and y == [-100, -100, -100, 8, 9]


def _tiny_model():
    import tempfile

    from conftest import make_tiny_lm
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        return AutoModelForCausalLM.from_pretrained(make_tiny_lm(d)).eval()


def _padded_logprob(model, x, y):
    """The textbook reference: one example alone, full logits, log_softmax, labelled positions summed."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([x])).logits[0, :-1].float(), -1)
    return sum(lp[i, t].item() for i, t in enumerate(y[1:]) if t != -100)


def test_packed_logprobs_equal_each_example_alone():
    """Packing several examples in one row leaks nothing between them: each one's sum equals its value alone,
    including an example with an empty prompt right after another (its first token is never a target)."""
    model = _tiny_model()
    exs = [
        build_example([5, 9], [6, 7], 1),
        build_example([5] * 6, [6], 1),
        build_example([], [8, 9, 10], None),
        build_example([4, 4, 4], [11, 12, 13, 14], 1),
    ]
    with torch.no_grad():
        packed, n = models.example_logprobs(model, exs)
    assert n.tolist() == [3, 2, 2, 5]  # labelled positions after the shift (no EOS for the cut third one)
    for got, (x, y) in zip(packed.tolist(), exs):
        assert got == pytest.approx(_padded_logprob(model, x, y), abs=1e-4)


def test_pack_fills_rows_no_longer_than_the_longest_example():
    exs = [([0] * n, [0] * n) for n in (4, 7, 3, 7, 1, 2)]
    rows, C = models.pack(exs)
    assert C == 7 and sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum(len(exs[i][0]) for i in r) <= C for r in rows)
    assert len(rows) == 4 and [0, 2] in rows  # 7 | 7 | 4+3 | 2+1: fewer rows than padding's 6
    # the logprob test below packs two examples into one row, so leakage between them would show
    assert any(
        len(r) > 1
        for r in models.pack(
            [build_example([5, 9], [6, 7], 1), build_example([5] * 6, [6], 1), build_example([], [8, 9, 10], None)]
        )[0]
    )


def test_pad_equal_to_eos_still_trains_the_real_eos():
    """A tokenizer whose pad is its EOS (Llama's usual setup): the EOS that ended a sample is a label of its SFT row
    and gets a loss term (log p(EOS) where it ended), and the packed row with another example trains nothing else."""
    tok = ByT5Tokenizer()
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id == models.pad_id(tok)
    model = _tiny_model()
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    a = models.example(tok, "ab", {"ids": enc("cd"), "end_id": tok.eos_token_id})  # ended: EOS trained
    b = models.example(tok, "a", {"ids": enc("xyz"), "end_id": None})  # cut at max_new_tokens: no EOS
    assert a[1][-1] == tok.eos_token_id == a[0][-1] and tok.eos_token_id not in b[1]
    long = build_example([5] * 9, [6], None)
    assert any(set(r) == {0, 1} for r in models.pack([a, b, long])[0])  # a and b share a packed row
    lp, seg, _ = models.token_logprobs(model, [a, b, long])
    mine = lp[seg == 0]
    assert len(mine) == 3 and (seg == 1).sum() == 3 and (seg == 2).sum() == 1
    with torch.no_grad():  # the last labelled position of a: log p(EOS | prompt, response) from a plain forward
        ref = torch.log_softmax(model(torch.tensor([a[0]])).logits[0, -2], -1)[tok.eos_token_id]
    assert mine[-1].item() == pytest.approx(ref.item(), abs=1e-5)


def test_packed_gradients_equal_separate_examples():
    """The SFT step's gradient from one packed row equals the sum of the examples' gradients taken one by one."""
    model = _tiny_model()
    exs = [build_example([5] * 6, [6, 9, 9, 7], 1), build_example([5, 9], [6, 7], 1), build_example([4], [8, 9], 1)]
    rows, _ = models.pack(exs)
    assert [1, 2] in rows or [2, 1] in rows  # two examples share a row: the packed backward really runs
    models.example_logprobs(model, exs)[0].sum().backward()
    assert model._raft_packing_exact  # and it was the packed path that produced these gradients
    packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for e in exs:
        models.example_logprobs(model, [e])[0].sum().backward()
    for g, p in zip(packed, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-5)


def test_cut_response_eos_stop_and_truncation():
    tok = ByT5Tokenizer()
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    eos = {tok.eos_token_id}
    r = cut_response(enc("hello") + [1, 0, 0], tok, eos, [])
    assert r == {"ids": enc("hello"), "text": "hello", "end_id": 1}
    r = cut_response(enc("sure thing\n\nHuman: more"), tok, eos, ["Human:"])
    assert r["text"] == "sure thing\n\n" and r["ids"] == enc("sure thing\n\n") and r["end_id"] == 1
    r = cut_response(enc("abc###Hu") + [1], tok, eos, ["###Hu", "zzz"])
    assert r["text"] == "abc"
    r = cut_response(enc("no end in sight"), tok, eos, ["Human:"])
    assert r["end_id"] is None and r["text"] == "no end in sight"


def test_prompt_encoding_never_ends_with_eos():
    tok = ByT5Tokenizer()  # T5-style tokenizers append </s> to every text by default
    assert data.encode_prompt(tok, "ab") == [ord("a") + 3, ord("b") + 3]


def test_generation_slices_exactly_the_new_tokens(tiny_lm):
    """Left-padded batched greedy decoding returns, per prompt, the tokens of an unpadded one-prompt generate."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    tok = ByT5Tokenizer()
    prompts = ["a", "a much longer prompt here", "mid size"]
    cfg = Config(temperature=0, max_new_tokens=8, gen_batch_size=3)
    got = sampling.generate(model, tok, prompts, 1, cfg)
    for p, (s,) in zip(prompts, got):
        ids = torch.tensor([data.encode_prompt(tok, p)])
        ref = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=1
        )[0, ids.shape[1] :].tolist()
        ref = ref[: ref.index(1)] if 1 in ref else ref
        assert s["ids"] == ref


def test_stage_prompts_without_replacement_then_reshuffle():
    seen = []
    for t in range(1, 4):  # 3 stages of 4 over 10 prompts: pass 0 ends inside stage 3
        idx, new_pass = stage_prompts(10, 4, t, seed=3)
        assert new_pass == (t == 3)
        seen += idx
    assert sorted(seen[:10]) == list(range(10))  # the first pass is a permutation: no prompt twice
    first, second = stage_prompts(10, 10, 1, 3)[0], stage_prompts(10, 10, 2, 3)[0]
    assert sorted(second) == list(range(10)) and second != first  # the second pass is reshuffled
    # from (seed, t) alone, whatever the global RNG holds: a resumed run gets the same prompts
    torch.manual_seed(0)
    a = [stage_prompts(10, 4, t, 3) for t in range(1, 6)]
    torch.manual_seed(1)
    torch.rand(7)
    assert a == [stage_prompts(10, 4, t, 3) for t in range(1, 6)]


def test_text_metrics_by_hand():
    toks = [tokenize("The cat, the cat!"), tokenize("a cat")]
    assert toks[0] == ["the", "cat", ",", "the", "cat", "!"]
    # bigrams: (the,cat) (cat,,) (,,the) (the,cat) (cat,!) | (a,cat) -> 6 bigrams, 5 distinct
    assert distinct_n(toks, 2) == pytest.approx(5 / 6)
    # unigrams: the×2 cat×3 ,×1 !×1 a×1 -> 8 tokens, 5 distinct; seen once: , ! a
    assert distinct_n(toks, 1) == pytest.approx(5 / 8) and unique_n(toks, 1) == 3
    assert unique_n(toks, 2) == 4
    words = [[f"w{i % 50}" for i in range(250)]]  # 2 full segments of 100 tokens, each with 50 types
    assert msttr(words) == pytest.approx(0.5)
    assert text_metrics(["x y", "z"])["mean_length"] == 1.5


def test_phase_records_seconds_and_gpu_memory_only_on_a_gpu():
    import time

    m = {}
    with dist.phase("sample", m, torch.device("cpu")):
        time.sleep(0.05)
    assert list(m) == ["time_sample"] and 0.05 <= m["time_sample"] < 5


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "gpt2", "gpt_neox",
            "gptj", "falcon", "olmo", "cohere", "gpt_bigcode", "codegen"]  # fmt: skip
LEAKY = ["opt", "bloom"]  # their attention ignores restarted position ids (OPT) or builds ALiBi from the 2-D mask


def tiny_family(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, n_positions=64, rotary_dim=4, ffn_dim=64,
              word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    if model_type != "falcon":
        kw["head_dim"] = 8
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw)).eval()


@pytest.mark.parametrize("model_type", FAMILIES + LEAKY)
def test_packed_log_probs_equal_each_example_alone(model_type):
    """Packing is exact on every family the kit names; OPT and BLOOM, where packed rows leak, are detected and fall
    back to one example per row, so SFT, the KL term and perplexity are right on all of them."""
    g = torch.Generator().manual_seed(0)
    exs = []
    for n in (5, 8, 3, 6):
        x = torch.randint(3, 64, (n,), generator=g).tolist()
        exs.append((x, [-100] * 2 + x[2:]))
    assert any(len(row) > 1 for row in models.pack(exs)[0])  # some row really holds two examples
    model = tiny_family(model_type)
    with torch.no_grad():
        got = models.example_logprobs(model, exs)[0]
        alone = torch.stack([models.example_logprobs(model, [e])[0][0] for e in exs])
        packed = models._logprobs(model, exs, False, packed=True)[0]
    assert model._raft_packing_exact == (model_type not in LEAKY)
    assert torch.allclose(got, alone, atol=2e-5), (got - alone).abs().max()
    if model_type in LEAKY:  # what the check guards against: the packed rows really differ here
        assert (packed - alone).abs().max() > 1e-3


def _shared_prompts(g, vocab=64):
    """Examples in groups with one prompt each (K samples of a prompt), responses of different lengths, some cut."""
    out = []
    for P, ns in ((5, (3, 1, 4)), (4, (2, 6)), (7, (5,))):
        p = torch.randint(3, vocab, (P,), generator=g).tolist()
        out += [build_example(p, torch.randint(3, vocab, (n,), generator=g).tolist(), 2 if n % 2 else None) for n in ns]
    return out


@pytest.mark.parametrize("model_type", FAMILIES + LEAKY)
def test_samples_of_one_prompt_share_it_and_get_the_same_log_probs(model_type):
    """The samples of one prompt hold it once in their row (its last token and each response after it, under a 4-D
    mask, at the positions each has alone): every family the kit names gives each example's value alone, checked
    once per model; OPT and BLOOM, whose packing leaks, never get there."""
    exs = _shared_prompts(torch.Generator().manual_seed(0))
    rows, C = models.pack(exs, shared=True)
    assert C == 4 + 5 + 3 + 5 and rows[0][:3] == [0, 1, 2]  # 4 prompt tokens once, then its last token + each response
    model = tiny_family(model_type)
    with torch.no_grad():
        got = models.example_logprobs(model, exs)[0]
        alone = torch.stack([models.example_logprobs(model, [e])[0][0] for e in exs])
    assert torch.allclose(got, alone, atol=2e-5), (got - alone).abs().max()
    assert getattr(model, "_raft_sharing_exact", False) == (model_type not in LEAKY)


def test_a_shared_prompt_gives_the_same_gradients():
    """The prompt held once takes the gradient of all its samples: the same as each example in a row of its own."""
    exs = _shared_prompts(torch.Generator().manual_seed(1), vocab=200)
    grads = []
    for layout in (dict(packed=True, shared=True), dict(packed=False)):
        model = _tiny_model()
        lp, seg, _ = models._tokens(model, exs, False, **layout)
        (-lp.sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_deal_keeps_a_prompts_samples_together_and_balances_ranks():
    exs = _shared_prompts(torch.Generator().manual_seed(0)) * 2  # six prompts, by identity of their tokens: three
    ranks = models.deal(exs, list(range(len(exs))), 2)
    assert sorted(i for r in ranks for i in r) == list(range(len(exs)))
    prompt = lambda i: tuple(exs[i][0][: models._prompt_len(exs[i][1])])  # noqa: E731
    assert all(len({r for r, rs in enumerate(ranks) if any(prompt(i) == prompt(j) for j in rs)}) == 1 for i in
               range(len(exs)))  # fmt: skip
    assert models.deal(exs, [0, 1, 2], 1) == [[0, 1, 2]]


def test_files_and_stage_directories_are_fsynced_around_each_rename(tmp_path, monkeypatch):
    """Written aside, fsynced (files, then the directory), renamed, and the parent fsynced after the rename, so a
    power cut never leaves a renamed but empty file or a stage directory whose name is not on disk."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))  # fmt: skip
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b)))
    data.save_stage(str(tmp_path), 3, {"stage": 3}, rows=[{"a": 1}], eval_rows=[])
    final, tmp = str(tmp_path / "stage_0003"), str(tmp_path / "stage_0003.tmp")
    rename = events.index(("replace", tmp, final))
    before = [e[1] for e in events[:rename] if e[0] == "fsync"]
    for name in ("selected.jsonl", "eval_samples.jsonl", "metrics.json"):
        assert os.path.join(tmp, name) in before  # every file is on disk before the directory gets its name
    assert before[-1] == tmp  # then the directory itself
    assert ("fsync", str(tmp_path)) in events[rename + 1 :]  # and the rename, in its parent


def test_a_saved_model_is_moved_aside_before_the_new_one_takes_its_place(tiny_lm, tmp_path, monkeypatch):
    """save_model_dir never deletes the old model before the new one is in place: at every moment one whole model
    exists (here: the rename of the new one fails, and the old one is still there, complete, beside it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_lm), AutoTokenizer.from_pretrained(tiny_lm)
    out = str(tmp_path / "m")
    data.save_model_dir(out, model, tok)
    real = os.replace

    def crash_on_the_new_model(a, b):
        if str(a).endswith("m.tmp"):
            raise OSError("power cut")
        return real(a, b)

    monkeypatch.setattr(os, "replace", crash_on_the_new_model)
    with pytest.raises(OSError):
        data.save_model_dir(out, model, tok)
    monkeypatch.setattr(os, "replace", real)
    assert AutoModelForCausalLM.from_pretrained(out + ".old") is not None  # the old model, whole
    data.save_model_dir(out, model, tok)  # the next save completes and cleans up
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_positive_keeps_every_correct_sample_and_counts_the_prompts_without_signal():
    s = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert select(s, ALL, "positive", torch.Generator()) == [(0, 0), (0, 2), (2, 0), (2, 1), (2, 2)]
    valid = ALL.clone()
    valid[2, 1] = False  # an invalid (empty, NaN, discarded) sample is never kept, even when it scores 1
    assert (2, 1) not in select(s, valid, "positive", torch.Generator())
    assert select(s * 0.5, ALL, "positive", torch.Generator(), threshold=0.5) == select(s, ALL, "positive", None)
    rows, kept, m = _rank([["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]], s.tolist(), ranking="positive")
    assert len(kept) == 5 and m["kept_per_prompt"] == pytest.approx(5 / 3)
    assert m["prompts_all_correct"] == pytest.approx(1 / 3) and m["prompts_none_correct"] == pytest.approx(1 / 3)


def test_clip_stops_gradients_where_it_should():
    """Hand-made ratios 0.5, 1, 1.5 with ε = 0.2: for A > 0 the clip holds above 1.2 (no gradient there), for A < 0
    below 0.8; elsewhere the gradient is r·A, as PPO's surrogate."""
    for adv, grads, held in [(1.0, [0.5, 1.0, 0.0], [False, False, True]),
                             (-1.0, [0.0, -1.0, -1.5], [True, False, False])]:  # fmt: skip
        lp = torch.tensor([0.5, 1.0, 1.5]).log().requires_grad_()
        obj, h = losses.token_objective(lp, torch.zeros(3), torch.full((3,), adv), "clip", 0.2, 0.2)
        obj.sum().backward()
        assert lp.grad.tolist() == pytest.approx(grads) and h.tolist() == held


def _tiny_examples(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = torch.randint(4, 60, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(4, 60, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        out.append(build_example(p, r, 2))
    return out


def test_clip_with_one_optimizer_step_equals_sft_and_then_departs():
    """One optimizer step per stage: π_θ = π_old at the step, every ratio is 1 and RAFT++ is the SFT step. With
    many steps at a large rate the ratios leave [1 − ε, 1 + ε], tokens are clipped and the two differ."""
    exs = _tiny_examples()

    def run(loss, steps, lr):
        model = tiny_family("llama")
        cfg = Config(lr=lr, epochs=steps, train_batch_size=len(exs), micro_batch_size=2, loss=loss)
        old, _ = models.policy_pass(model, exs, 4, spread=False)
        stats = {}
        extra = dict(old=old, stats=stats) if loss == "clip" else {}  # advantage 1, the default
        raft.finetune(model, exs, cfg, seed=0, **extra)
        return model.state_dict(), stats

    (sft, _), (pp, stats) = run("sft", 1, 1e-2), run("clip", 1, 1e-2)
    assert all(torch.allclose(sft[k], pp[k], atol=1e-6) for k in sft) and stats["clip_frac"] == 0.0
    (sft, _), (pp, stats) = run("sft", 8, 5e-2), run("clip", 8, 5e-2)
    assert stats["clip_frac"] > 0 and any(not torch.allclose(sft[k], pp[k], atol=1e-4) for k in sft)


def test_entropy_of_the_sampling_policy_matches_a_direct_computation():
    model, exs = tiny_family("llama"), _tiny_examples()
    old, per = models.policy_pass(model, exs, 4, spread=False)
    entropy = sum(e for e, _, _ in per) / sum(n for _, n, _ in per)
    ents, lps = [], []
    with torch.no_grad():
        for x, y in exs:  # one example alone, the whole vocabulary, position j predicting token j + 1
            logp = model(input_ids=torch.tensor([x])).logits[0].float().log_softmax(-1)
            at = [j for j in range(len(x) - 1) if y[j + 1] != -100]
            ents += [-(logp[j].exp() * logp[j]).sum().item() for j in at]
            lps.append(torch.tensor([logp[j, y[j + 1]].item() for j in at]))
    assert entropy == pytest.approx(sum(ents) / len(ents), abs=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(old, lps))


def test_global_keeps_only_the_valid_samples_when_fewer_than_b_are():
    """b = 3 prompts but only 2 valid samples (the rest empty, discarded by --discard_regex or NaN): global ranking
    keeps those 2 and nothing else, even where an invalid one scores higher."""
    nan = float("nan")
    rows, kept, m = _rank(
        [["a", "", "b"], ["#x", "c", "d"], ["e", "f", "g"]],
        [[1, 9, nan], [9, 0.5, nan], [nan, nan, nan]],
        ranking="global",
        discard_regex="#",
    )
    assert [(r["prompt"], r["response"]) for r in rows] == [("p0", "a"), ("p1", "c")]
    assert m["n_selected"] == 2 and m["prompts_skipped"] == 1 and m["samples_nan_reward"] == 5
    valid = torch.zeros(3, 3, dtype=torch.bool)
    valid[0, 2] = valid[2, 0] = True
    assert select(S, valid, "global", torch.Generator()) == [(0, 2), (2, 0)]


def _update(exs, **cfg_kw):
    """The change of every weight of the tiny Llama after raft.finetune (one model, same seed each call)."""
    model = tiny_family("llama")
    before = [p.detach().clone() for p in model.parameters()]
    raft.finetune(model, exs, Config(**{"lr": 1.0, "epochs": 1, **cfg_kw}), seed=0)
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])


def test_micro_batches_accumulate_to_the_same_update(monkeypatch):
    """--micro_batch_size only splits the forward passes: 8, 2 and 3 (uneven: 3 + 3 + 2) samples per pass with the
    same --train_batch_size give the same gradient, so the same update (plain SGD makes the gradient visible)."""
    monkeypatch.setattr(torch.optim, "AdamW", PlainSGD)
    exs = _tiny_examples(8, seed=1)
    whole = _update(exs, train_batch_size=8, micro_batch_size=8, max_grad_norm=1e9)
    assert whole.abs().max() > 1e-3
    for micro in (2, 3):
        part = _update(exs, train_batch_size=8, micro_batch_size=micro, max_grad_norm=1e9)
        assert torch.allclose(part, whole, atol=1e-6), (micro, (part - whole).abs().max())


def test_gradients_are_clipped_to_max_grad_norm(monkeypatch):
    """A gradient far above --max_grad_norm is scaled down to exactly that norm, keeping its direction."""
    monkeypatch.setattr(torch.optim, "AdamW", PlainSGD)
    exs = _tiny_examples(4)
    free = _update(exs, train_batch_size=4, micro_batch_size=4, max_grad_norm=1e9)
    clipped = _update(exs, train_batch_size=4, micro_batch_size=4, max_grad_norm=1e-2)
    assert free.norm() > 1.0  # the plain gradient is 100× the limit
    assert clipped.norm().item() == pytest.approx(1e-2, rel=1e-3)
    assert torch.allclose(clipped, free * (1e-2 / free.norm()), atol=1e-7)


def test_foreach_adamw_gives_the_single_tensor_update_bit_for_bit(monkeypatch):
    """The AdamW of make_optimizer runs foreach on the CPU for speed; the demos' numbers were measured with the
    single-tensor loop, and the two give the same weights, bit for bit, after several steps with weight decay."""
    exs = _tiny_examples(12, seed=2)
    fast = _update(exs, lr=1e-2, weight_decay=0.1, train_batch_size=4, micro_batch_size=4)
    real = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, foreach=None, **kw: real(*a, foreach=False, **kw))
    slow = _update(exs, lr=1e-2, weight_decay=0.1, train_batch_size=4, micro_batch_size=4)
    assert fast.abs().max() > 1e-3 and torch.equal(fast, slow)


def test_lr_decays_linearly_to_zero_over_the_real_step_count(monkeypatch):
    """10 examples, batches of 4, 2 epochs: 3 + 3 = 6 optimizer steps (the last batch of each epoch has 2), at
    lr·(1 − s/6) for s = 0 … 5."""
    seen = []

    class Recording(torch.optim.AdamW):
        def step(self, *a, **kw):
            seen.append(self.param_groups[0]["lr"])
            return super().step(*a, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    cfg = Config(lr=0.01, epochs=2, train_batch_size=4, micro_batch_size=4)
    raft.finetune(tiny_family("llama"), _tiny_examples(10), cfg, seed=0)
    assert seen == pytest.approx([0.01 * (1 - s / 6) for s in range(6)])


def test_a_generator_with_another_tokenizer_is_retokenized_for_the_policy():
    """--generator_model with its own tokenizer (a BPE here, the policy's is byte-level): the samples the policy
    trains on carry the policy tokenizer's ids of the generated text and its EOS, not the generator's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from demo import train_demo_tokenizer

    gtok = train_demo_tokenizer(["the cat sat on the mat and the movie was great"] * 20, vocab_size=300)
    torch.manual_seed(0)
    small = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2
    )
    gen = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(gtok), eos_token_id=gtok.eos_token_id, pad_token_id=gtok.pad_token_id, **small)
    ).eval()
    tok = ByT5Tokenizer()
    assert gtok.eos_token_id != tok.eos_token_id
    cfg = Config(K=4, max_new_tokens=8, stop=["e"])  # a stop string ends a response with the tokenizer's EOS
    flat = [s for row in raft.sample(gen, gtok, tok, ["the cat", "a movie"], cfg, t=1) for s in row if s["text"]]
    assert flat and any(s["end_id"] is not None for s in flat)
    for s in flat:
        assert s["ids"] == tok(s["text"], add_special_tokens=False)["input_ids"]
        assert s["end_id"] in (None, tok.eos_token_id)
    assert any(s["ids"] != gtok(s["text"], add_special_tokens=False)["input_ids"] for s in flat)
    x, y = models.example(tok, "the cat", flat[0])  # the SFT row: the policy's ids of prompt and response
    assert x == data.encode_prompt(tok, "the cat") + flat[0]["ids"] + ([tok.eos_token_id] if flat[0]["end_id"] else [])


def test_tensorboard_logger_writes_the_numbers_and_flushes_every_stage(tmp_path, monkeypatch):
    """--report_to tensorboard: each stage's numeric metrics go to the writer and reach the disk at once (the writer
    has no exit hook, and a torchrun worker ends without Python's shutdown). A stand-in writer: tensorboard itself
    is an optional package."""
    import sys
    import types

    calls = []

    class Writer:
        def __init__(self, log_dir):
            calls.append(("dir", log_dir))

        def add_scalar(self, k, v, step):
            calls.append(("scalar", k, v, step))

        def flush(self):
            calls.append(("flush",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    log = dist.make_logger("tensorboard", str(tmp_path), {})
    log({"eval_reward_mean": 0.5, "stage": 1, "note": "text"}, 1)
    log({"eval_reward_mean": 0.7}, 2)
    assert calls[0] == ("dir", os.path.join(str(tmp_path), "tensorboard"))
    stage1 = [("scalar", "eval_reward_mean", 0.5, 1), ("scalar", "stage", 1, 1), ("flush",)]  # the text is left out
    assert calls[1:] == stage1 + [("scalar", "eval_reward_mean", 0.7, 2), ("flush",)]
