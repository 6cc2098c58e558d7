"""fastgen.py, the fast sampler of step 1: greedy tokens equal model.generate's (Llama with GQA, Qwen2 with biases,
LoRA, and seven more families), sampling follows HF's warpers exactly in distribution, sampling.generate gives the
same responses with either backend, and a model the fast path cannot run falls back to model.generate."""

import pytest
import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import data
import fastgen
import models
import raft
import sampling

EOS, PAD = 3, 0


def tiny(cls=LlamaForCausalLM, config=LlamaConfig, vocab=97, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=EOS,
        pad_token_id=PAD,
        bos_token_id=1,
        **kw,
    )
    return cls(cfg).eval()


def prompts(n=7, vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        [1] + torch.randint(4, vocab, (int(torch.randint(0, 13, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def hf_greedy(model, ps, new, eos):
    """model.generate on the left-padded batch: the reference."""
    L = max(map(len, ps))
    ids = torch.tensor([[PAD] * (L - len(p)) + p for p in ps])
    mask = (ids != PAD).long()
    mask[:, -1] = 1
    for r, p in enumerate(ps):
        mask[r, L - len(p) :] = 1
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        generation_config=GenerationConfig(do_sample=False, max_new_tokens=new, eos_token_id=eos, pad_token_id=PAD),
    )
    return [fastgen._until_eos(row, eos) for row in out[:, L:].tolist()]


def a_frequent_token(model, ps):
    """A token that greedy decoding emits mid-sequence, used as EOS so that some samples end early."""
    seqs = hf_greedy(model, ps, 10, [EOS])
    counts = torch.bincount(torch.tensor([t for s in seqs for t in s[2:6]]))
    return int(counts.argmax())


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2-bias", "lora"])
def test_greedy_tokens_equal_model_generate(arch):
    if arch == "qwen2-bias":
        model = tiny(Qwen2ForCausalLM, Qwen2Config)
    else:
        model = tiny()
    if arch == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    ps = prompts()
    eos = a_frequent_token(model, ps)
    ref = hf_greedy(model, ps, 16, [eos])
    assert any(len(r) < 16 for r in ref) and any(len(r) == 16 for r in ref)  # some end early, some run out
    # several batches (and a last short one), all in one, and the CUDA-graph layout (prompt lengths rounded up to
    # a bucket, the last batch padded with copies) run eagerly here
    for batch, static in ((3, False), (64, False), (3, True)):
        out = fastgen.sample(
            model,
            ps,
            2,
            max_new_tokens=16,
            eos_ids={eos},
            pad_id=PAD,
            temperature=0,
            batch_prompts=batch,
            static_shapes=static,
            bucket=8,
        )
        assert [o[0] for o in out] == ref and [o[1] for o in out] == ref


FAMILIES = {  # what each adds: q/k norms, fused qkv, a head_dim and scaling of its own, interleaved sliding-window
    # layers (windows longer than the sequence), partial rotary, learned positions with Conv1D, learned offset positions
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {}),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {}),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {"head_dim": 16}),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", {"head_dim": 16}),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", {}),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", {}),
    "opt": ("OPTForCausalLM", "OPTConfig", {}),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_model_generate_across_model_families(family):
    import transformers

    cls, config, kw = FAMILIES[family]
    model = tiny(getattr(transformers, cls), getattr(transformers, config), **kw)
    ps = prompts()
    eos = a_frequent_token(model, ps)
    ref = hf_greedy(model, ps, 16, [eos])
    out = fastgen.sample(model, ps, 2, max_new_tokens=16, eos_ids={eos}, pad_id=PAD, temperature=0, batch_prompts=3)
    assert [o[0] for o in out] == ref and [o[1] for o in out] == ref


def _target(logits, temperature, top_k, top_p):
    """HF's warpers in HF's order, then softmax: the distribution generate samples from."""
    s = logits[None].clone()
    s = TemperatureLogitsWarper(temperature)(None, s)
    if top_k:
        s = TopKLogitsWarper(top_k)(None, s)
    if top_p < 1:
        s = TopPLogitsWarper(top_p)(None, s)
    return s.softmax(-1)[0]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8)])
def test_sampling_follows_hf_warpers(temperature, top_k, top_p):
    """First and second sampled tokens of 20,000 samples of one prompt against the exact distributions (the second
    marginalised over the first): total variation < 0.03, and no token outside the top-k / nucleus ever appears."""
    V = 16
    model = tiny(vocab=V, seed=2)
    with torch.no_grad():  # sharpen the random model a little so top-k / top-p have something to cut
        model.lm_head.weight.mul_(8)
    p = [1, 7, 9, 4]
    n = 20000
    torch.manual_seed(0)
    out = fastgen.sample(
        model,
        [p],
        n,
        max_new_tokens=2,
        eos_ids=set(),
        pad_id=PAD,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        batch_prompts=1,
    )[0]
    with torch.no_grad():
        first = _target(model(torch.tensor([p])).logits[0, -1], temperature, top_k, top_p)
        nxt = model(torch.tensor([p + [a] for a in range(V)])).logits[:, -1]
        second = sum(first[a] * _target(nxt[a], temperature, top_k, top_p) for a in range(V))
    for dist, pos in ((first, 0), (second, 1)):
        emp = torch.bincount(torch.tensor([o[pos] for o in out]), minlength=V).double() / n
        assert 0.5 * (emp - dist.double()).abs().sum() < 0.03
        assert emp[dist == 0].sum() == 0
    assert (first > 0).sum() < V or (top_k == 0 and top_p == 1)  # the filters did cut something


def test_pick_greedy_and_filters_unit():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    assert fastgen.pick(logits, 0, 0, 1.0).item() == 1
    torch.manual_seed(0)
    draws = {fastgen.pick(logits, 1.0, 2, 1.0).item() for _ in range(200)}
    assert draws == {1, 2}  # top-2 only, and both of them
    draws = {fastgen.pick(logits, 1.0, 0, 0.5).item() for _ in range(200)}
    assert draws == {1}  # token 1 alone holds > 50% of the mass


def test_unsupported_attention_raises_before_sampling():
    model = tiny(MistralForCausalLM, MistralConfig, sliding_window=4)  # a window shorter than prompt + response
    with pytest.raises(fastgen.Unsupported):
        fastgen.sample(model, prompts(3), 2, max_new_tokens=8, eos_ids={EOS}, pad_id=PAD, temperature=0)
    assert model.config._attn_implementation != fastgen.ATTN  # the model's own attention is restored
    wide = tiny(MistralForCausalLM, MistralConfig, sliding_window=4096)  # a window that covers everything is fine
    out = fastgen.sample(wide, prompts(3), 2, max_new_tokens=8, eos_ids={EOS}, pad_id=PAD, temperature=0)
    assert [o[0] for o in out] == hf_greedy(wide, prompts(3), 8, [EOS])


def test_raft_generate_same_responses_with_either_backend(tiny_lm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    model = LlamaForCausalLM.from_pretrained(tiny_lm).eval()
    ps = ["Q1: why is the sky", "Q2: tell me a story about a cat A:", "Q3:"]
    got = {}
    for backend in ("fast", "hf"):
        cfg = raft.Config(temperature=0, max_new_tokens=12, gen_backend=backend, stop=["A:"], gen_batch_size=2)
        got[backend] = sampling.generate(model, tok, ps, 2, cfg)
    assert got["fast"] == got["hf"]
    assert all(len(row) == 2 for row in got["fast"])


def test_soft_capping_is_refused_before_any_sample():
    import transformers

    model = tiny(transformers.Gemma2ForCausalLM, transformers.Gemma2Config, head_dim=16)
    with pytest.raises(fastgen.Unsupported, match="soft-capping"):
        fastgen.sample(model, prompts(), 2, max_new_tokens=4, eos_ids=set(), pad_id=PAD)


def test_raft_generate_falls_back_to_hf(capsys):
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    model = tiny(MistralForCausalLM, MistralConfig, vocab=len(tok), sliding_window=4)
    model.generation_config.eos_token_id = tok.eos_token_id
    cfg = raft.Config(temperature=0, max_new_tokens=6, gen_backend="fast")
    fast = sampling.generate(model, tok, ["hello", "a"], 2, cfg)
    assert "generating with model.generate instead" in capsys.readouterr().out
    hf = sampling.generate(
        model, tok, ["hello", "a"], 2, raft.Config(temperature=0, max_new_tokens=6, gen_backend="hf")
    )
    assert fast == hf and len(fast) == 2
    assert sampling.generate(model, tok, ["hello", "a"], 2, cfg) == hf  # the next phase: no second attempt, no notice
    assert "model.generate instead" not in capsys.readouterr().out


def test_hf_backend_samples_with_the_kits_options_only(tmp_path):
    """A generation_config.json with repetition_penalty 3 and no_repeat_ngram_size 2 (chat models ship such values)
    changes nothing: greedy hf equals greedy fast token for token, and the setting really would have mattered."""
    model = tiny()
    model.generation_config = GenerationConfig(repetition_penalty=3.0, no_repeat_ngram_size=2, eos_token_id=EOS,
                                               pad_token_id=PAD)  # fmt: skip
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    ps = ["hello there", "a"]
    model.resize_token_embeddings(len(tok))
    cfg = lambda backend: raft.Config(temperature=0, max_new_tokens=12, gen_backend=backend)
    fast = sampling.generate(model, tok, ps, 1, cfg("fast"))
    hf = sampling.generate(model, tok, ps, 1, cfg("hf"))
    assert [r[0]["ids"] for r in hf] == [r[0]["ids"] for r in fast]
    enc = [data.encode_prompt(tok, p) for p in ps]
    with torch.no_grad():  # what model.generate does when it follows the model's generation_config
        ids, valid = fastgen.left_pad(enc, max(map(len, enc)), PAD)
        out = model.generate(input_ids=ids, attention_mask=valid.long(), max_new_tokens=12, do_sample=False)
    followed = [fastgen._until_eos(row, [EOS]) for row in out[:, ids.shape[1] :].tolist()]
    assert followed != [r[0]["ids"] for r in fast]


def test_left_padded_prompts_in_one_batch_sample_as_each_prompt_alone():
    """Three prompts of different lengths in one left-padded batch (a λ > 0 sample per row): each prompt's first
    and second tokens follow that prompt's own distribution, computed from it alone without padding. The prompts'
    distributions differ, so padding that leaks into attention, or rows that swap, would show."""
    V, K = 16, 4000
    model = tiny(vocab=V, seed=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(4)
    ps = [[1, 7, 9, 4, 12, 5, 8], [1, 5], [1, 8, 2, 6]]
    torch.manual_seed(0)
    out = fastgen.sample(model, ps, K, max_new_tokens=2, eos_ids=set(), pad_id=PAD, temperature=1.0, top_p=0.95,
                         batch_prompts=3, cuda_graphs=False)  # fmt: skip
    exact = []
    for p, rows in zip(ps, out):
        with torch.no_grad():
            first = _target(model(torch.tensor([p])).logits[0, -1], 1.0, 0, 0.95)
            nxt = model(torch.tensor([p + [a] for a in range(V)])).logits[:, -1]
        second = sum(first[a] * _target(nxt[a], 1.0, 0, 0.95) for a in range(V))
        exact.append(first)
        for dist, pos in ((first, 0), (second, 1)):
            emp = torch.bincount(torch.tensor([o[pos] for o in rows]), minlength=V).double() / K
            assert 0.5 * (emp - dist.double()).abs().sum() < 0.045, (p, pos)
    tv = lambda a, b: 0.5 * (a - b).abs().sum().item()
    assert min(tv(exact[i], exact[j]) for i, j in ((0, 1), (0, 2), (1, 2))) > 0.15


def test_fastgen_samples_from_an_fsdp2_model_with_bf16_compute(tiny_lm):
    """Found by plan.py: FSDP2 with a bf16 param_dtype casts a forward's inputs by rebuilding every dict and list in
    them, so fastgen's cache, written into its state by the attention, was lost and the paper's run (torchrun,
    --bf16, full fine-tuning) failed at its first sampling call. On real tensors, one process on gloo."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = models.AutoModelForCausalLM.from_pretrained(tiny_lm)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        with models.full_weights(model):
            out = fastgen.sample(model, [[5, 6, 7], [8, 9]], 2, max_new_tokens=4, eos_ids=[], pad_id=0,
                                 temperature=0, autocast_dtype=torch.bfloat16)  # fmt: skip
        assert [[len(s) for s in row] for row in out] == [[4, 4], [4, 4]]
    finally:
        torch.distributed.destroy_process_group()
