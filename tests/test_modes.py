"""Memory modes on CPU with tiny models: LoRA, 8-bit base + LoRA (bitsandbytes runs on CPU here), bf16, gradient
checkpointing. Each finishes a stage and changes exactly what it should."""

import dataclasses
import json
import math
import os

import pytest
import torch
from conftest import tiny_args
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import models
import raft
import sampling

GREEDY = raft.Config(temperature=0, max_new_tokens=10)
PROMPTS = ["Q1: why is the sky blue A:", "Q2: tell me a story A:"]


def greedy(model, tok):
    return [s[0]["ids"] for s in sampling.generate(model, tok, PROMPTS, 1, GREEDY)]


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lora_trains_only_adapters_the_policy_samples_with_them_and_merge_matches(tiny_lm, prompts_file, tmp_path):
    out = tmp_path / "lora"
    cfg = raft.parse(
        tiny_args(tiny_lm, prompts_file, out, "--stages", "2", "--lora_r", "8", "--lr", "1e-2", "--merge_lora")
    )
    rows, model = raft.run(cfg)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out / "stage_0001"))
    assert not (out / "stage_0001" / "model.safetensors").exists()  # only the adapters are saved per stage
    base = load_file(os.path.join(tiny_lm, "model.safetensors"))
    trained = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in state(model).items()
        if "lora_" not in k
    }
    assert all(torch.equal(base[k], trained[k]) for k in base if k in trained) and len(trained) >= len(base) - 1
    a1 = load_file(out / "stage_0001" / "adapter_model.safetensors")
    a2 = load_file(out / "stage_0002" / "adapter_model.safetensors")
    assert any(not torch.equal(a1[k], a2[k]) for k in a1)  # stage 2 trained the adapters further

    # the policy that samples is the trained one: the in-memory model = base + the last saved adapters != base
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), out / "stage_0002").eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    assert greedy(model, tok) == greedy(reloaded, tok) != greedy(plain, tok)
    # --merge_lora: a plain HF model that generates the same greedy tokens as base + adapters
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert not any("lora" in k for k in merged.state_dict())
    assert greedy(merged, tok) == greedy(reloaded, tok)


def test_lora_resume_continues_from_the_adapters_and_keeps_p0_the_base(tiny_lm, prompts_file, tmp_path, monkeypatch):
    """A resumed LoRA run repeats the uninterrupted one, KL to the start included; the KL reference p_0 (the adapters
    switched off) is the stage-0 model also after --resume, and the policy has moved away from it."""
    kls, real = [], raft.make_kl
    monkeypatch.setattr(raft, "make_kl", lambda *a: kls.append(real(*a)) or kls[-1])
    extra = ["--lora_r", "4", "--lr", "1e-2", "--eval_kl"]
    whole = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "a", "--stages", "2", *extra))
    raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "b", "--stages", "1", *extra))
    resumed = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "b", "--stages", "2", "--resume", *extra))
    drop = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]
    assert drop(resumed) == drop(whole)
    assert whole[0]["eval_kl_to_start"] == pytest.approx(0, abs=1e-5) and abs(whole[2]["eval_kl_to_start"]) > 1e-3
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    sel = [json.loads(line) for line in open(tmp_path / "b" / "stage_0002" / "selected.jsonl")]
    exs = [models.example(tok, s["prompt"], {"ids": tok(s["response"], add_special_tokens=False)["input_ids"],
                                             "end_id": tok.eos_token_id}) for s in sel]  # fmt: skip
    policy, p0 = kls[-1](exs)  # the resumed run's KL term
    base = models.sequence_logprobs(AutoModelForCausalLM.from_pretrained(tiny_lm), exs, 8)
    assert p0 == pytest.approx(base, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(policy, p0)) > 1e-2


def test_8bit_base_loads_int8_layers_and_trains_adapters(tiny_lm, prompts_file, tmp_path):
    import bitsandbytes as bnb

    cfg = raft.parse(
        tiny_args(
            tiny_lm,
            prompts_file,
            tmp_path / "q",
            "--stages",
            "1",
            "--load_in_8bit",
            "--lora_r",
            "4",
            "--lr",
            "1e-2",
        )
    )
    model, _ = models.load_policy(cfg, torch.device("cpu"))
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    before = {k: v.clone() for k, v in state(model).items()}
    rows, model = raft.run(cfg)
    after = state(model)
    changed = {k for k in before if not torch.equal(before[k].float(), after[k].float())}
    assert changed and all("lora_" in k for k in changed)


def test_gen_dequantized_copy_matches_the_8bit_policy(tiny_lm, prompts_file, tmp_path, monkeypatch):
    """--gen_dequantized: the plain copy (int8 dequantized, adapters merged) computes what the 8-bit model with its
    adapters computes, its greedy samples match, and a stage samples from it and trains the adapters."""
    import bitsandbytes as bnb

    cfg = raft.parse(
        tiny_args(
            tiny_lm,
            prompts_file,
            tmp_path / "q",
            "--stages",
            "1",
            "--load_in_8bit",
            "--lora_r",
            "4",
            "--lr",
            "1e-2",
            "--gen_dequantized",
        )
    )
    model, tok = models.load_policy(cfg, torch.device("cpu"))
    with torch.no_grad():  # non-zero adapters, so that the merge matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    plain = models.dequantized_copy(model)
    assert not any(isinstance(m, bnb.nn.Linear8bitLt) for m in plain.modules())
    ids = torch.tensor([tok("why is the sky blue")["input_ids"]])
    with torch.no_grad(), model.disable_adapter():
        bare = model(ids).logits
    with torch.no_grad():
        ref, got = model(ids).logits, plain(ids).logits
    assert (ref - bare).abs().max() > 0.05  # the adapters change the output ...
    assert (ref - got).abs().max() < 0.02 * (ref - bare).abs().max() + 1e-3  # ... and the copy has them
    greedy = dataclasses.replace(cfg, temperature=0, max_new_tokens=8)
    ps = ["why is the sky", "tell me a story"]
    assert sampling.generate(model, tok, ps, 1, greedy) == sampling.generate(
        model, tok, ps, 1, dataclasses.replace(greedy, gen_dequantized=False)
    )
    made = []
    real = sampling.dequantized_copy
    monkeypatch.setattr(sampling, "dequantized_copy", lambda m: made.append(1) or real(m))
    before = {k: v.clone() for k, v in state(models.load_policy(cfg, torch.device("cpu"))[0]).items() if "lora_" in k}
    rows, model = raft.run(cfg)
    assert made and math.isfinite(rows[1]["sft_loss"])  # the stage sampled from the dequantized copy, and trained
    after = state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_8bit_full_finetuning_is_refused(tiny_lm, prompts_file, tmp_path):
    with pytest.raises(SystemExit, match="--lora_r"):
        raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "x", "--load_in_8bit"))


@pytest.mark.parametrize("extra", [["--bf16"], ["--bf16", "--lora_r", "4"], ["--gradient_checkpointing"]])
def test_bf16_and_checkpointing_stages_finish_and_learn(tiny_lm, prompts_file, tmp_path, extra):
    rows, model = raft.run(raft.parse(tiny_args(tiny_lm, prompts_file, tmp_path / "m", "--stages", "1", *extra)))
    assert math.isfinite(rows[1]["sft_loss"])
    params = dict(model.named_parameters())
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    # full fine-tuning keeps fp32 master weights under --bf16; LoRA keeps the frozen base in bf16
    assert all(p.dtype == torch.float32 for p in trainable.values())
    if "--lora_r" in extra:
        assert any(p.dtype == torch.bfloat16 for p in params.values() if not p.requires_grad)
        assert any(p.abs().max() > 0 for n, p in trainable.items() if "lora_B" in n)  # B starts at 0: it trained
    else:
        base = load_file(os.path.join(tiny_lm, "model.safetensors"))
        assert any(not torch.equal(base[k], v) for k, v in state(model).items() if k in base)
    assert model.is_gradient_checkpointing == ("--gradient_checkpointing" in extra)
    if extra == ["--bf16"]:  # the loss of the kept set under bf16 autocast: near the fp32 value, not equal to it
        tok = AutoTokenizer.from_pretrained(tiny_lm)
        sel = [json.loads(line) for line in open(tmp_path / "m" / "stage_0001" / "selected.jsonl")]
        exs = [models.example(tok, s["prompt"], {"ids": tok(s["response"], add_special_tokens=False)["input_ids"],
                                                 "end_id": None}) for s in sel]  # fmt: skip
        with torch.no_grad():
            nll = [-models.token_logprobs(model, exs, bf16)[0].mean().item() for bf16 in (True, False)]
        assert nll[0] != nll[1] and nll[0] == pytest.approx(nll[1], rel=2e-2), nll


def test_reward_model_in_8bit_scores_like_full_precision(tmp_path):
    """--reward_load_in_8bit: int8 linear layers, scores close to the fp32 model's (same order of the samples)."""
    import bitsandbytes as bnb
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForSequenceClassification

    from reward import load_reward

    tok = ByT5Tokenizer()
    torch.manual_seed(0)
    LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_labels=1,
            pad_token_id=tok.pad_token_id,
        )
    ).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    prompts, responses = (
        ["a", "bb", "question?", "x y z"] * 2,
        ["yes", "no", "maybe so", "a long answer", "", "?", "ok then", "z"],
    )
    full = load_reward(str(tmp_path / "rm"))(prompts, responses)
    fn = load_reward(str(tmp_path / "rm"), load_in_8bit=True)
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in fn.model.modules()) == 2 * 7  # q k v o gate up down
    int8 = fn(prompts, responses)
    spread = max(full) - min(full)
    assert spread > 0 and max(abs(a - b) for a, b in zip(full, int8)) < 0.2 * spread
    assert torch.corrcoef(torch.tensor([full, int8]))[0, 1] > 0.9


def test_bf16_kl_reference_takes_the_policys_precision_path(tiny_lm, prompts_file, tmp_path):
    """Under --bf16 full fine-tuning p_0 is fp32 under bf16 autocast, exactly as the policy: stage 0 measures a KL of
    exactly 0 (a bf16-stored reference measured a mean of -0.0024 and up to 0.013 nats). A frozen generator copy
    (frozen=True) is still stored in bf16."""
    cfg = raft.parse(tiny_args(tiny_lm, prompts_file, tmp_path / "x", "--bf16"))
    frozen, _ = models.load_policy(cfg, torch.device("cpu"), frozen=True)
    policy, _ = models.load_policy(cfg, torch.device("cpu"))
    assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    rows = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "r", "--stages", "1", "--bf16", "--kl_beta", "0.1"))
    assert rows[0]["eval_kl_to_start"] == 0.0
    assert rows[1]["kl_to_start"] == 0.0  # stage 1 samples from p_0 itself: every log-ratio is exactly 0
    assert rows[1]["eval_kl_to_start"] != 0.0  # after fine-tuning the policy has moved
