"""Tries vllm_gen.make_engine on models vLLM cannot run, in a process of its own (a failed engine start may leave
state behind): `python engine_probe.py DIR [--no-vllm] NAME...` builds them under DIR and prints one line each."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]


def build(d):
    from conftest import make_tiny_lm
    from transformers import T5Config, T5ForConditionalGeneration

    make_tiny_lm(f"{d}/h16", hidden=32)  # head size 16: vLLM's CPU attention kernels have none
    cfg = T5Config(vocab_size=384, d_model=64, d_kv=32, d_ff=128, num_layers=1, num_heads=2)
    T5ForConditionalGeneration(cfg).save_pretrained(f"{d}/t5")  # an encoder-decoder, not a causal LM


if __name__ == "__main__":
    d, names = sys.argv[1], [a for a in sys.argv[2:] if a != "--no-vllm"]
    build(d)
    if "--no-vllm" in sys.argv:
        sys.modules["vllm"] = None  # as if vLLM were not installed: `import vllm` raises ImportError
    import vllm_gen

    for name in names:
        try:
            vllm_gen.make_engine(f"{d}/{name}", max_model_len=64)
            print("STARTED", name)
        except SystemExit as e:
            print("EXIT", name, e)
