"""--gen_backend vllm, run as a user runs it (a subprocess): the demo (demo.py) learns; after a stage of raft.py the
engine samples from the new weights (full fine-tuning pushes them, LoRA hands over the adapters); a killed run
resumes to the same result as an uninterrupted one. Runs only in the vLLM environment (.ci/vllm)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_lm, tiny_args, write_prompts
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def raft_py(*args, env=None, ok=True, script="raft.py"):
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env={**ENV, **(env or {})},
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert (out.returncode == 0) == ok, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def rows(run_dir, name="metrics.jsonl"):
    return [json.loads(line) for line in open(os.path.join(run_dir, name))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm_loop")
    # hidden 64 with 2 heads: head size 32 (vLLM's CPU attention has no 16)
    return make_tiny_lm(d / "lm", hidden=64), write_prompts(d / "prompts.jsonl", 48)


def test_the_demo_learns_with_vllm(tmp_path):
    dirs = ["--demo_dir", str(tmp_path / "m"), "--out_dir", str(tmp_path / "r")]
    raft_py("--gen_backend", "vllm", "--stages", "3", *dirs, script="demo.py")
    curve = [r["eval_reward_mean"] for r in rows(tmp_path / "r")]
    assert curve[-1] > curve[0] + 0.15, curve


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_after_a_stage_the_engine_samples_from_the_new_weights(tiny, tmp_path, mode):
    """Greedy held-out samples after stage 1 come from the engine; they equal HF greedy on the saved stage-1 model
    (and differ from stage 0's, so the weights really moved)."""
    lm, prompts = tiny
    extra = ["--lora_r", "8", "--lora_dropout", "0"] if mode == "lora" else []
    raft_py(*tiny_args(lm, prompts, tmp_path / "r", "--gen_backend", "vllm", "--temperature", "0", "--stages", "1",
                       "--lr", "3e-2", "--epochs", "3", *extra))  # fmt: skip
    import sampling
    from raft import Config

    stage = str(tmp_path / "r" / "stage_0001")
    if mode == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm), stage)
    else:
        model = AutoModelForCausalLM.from_pretrained(stage)
    tok = AutoTokenizer.from_pretrained(lm)
    evals = [rows(tmp_path / "r" / f"stage_000{t}", "eval_samples.jsonl") for t in (0, 1)]
    cfg = Config(temperature=0, max_new_tokens=12, gen_backend="hf")
    with torch.no_grad():
        hf = sampling.generate(model, tok, [r["prompt"] for r in evals[1]], 1, cfg)
    assert [r["response"] for r in evals[1]] == [s[0]["text"] for s in hf]
    assert [r["response"] for r in evals[0]] != [r["response"] for r in evals[1]]


def test_killed_then_resumed_equals_uninterrupted(tiny, tmp_path):
    lm, prompts = tiny
    args = lambda d: tiny_args(lm, prompts, tmp_path / d, "--gen_backend", "vllm", "--stages", "2")  # noqa: E731
    raft_py(*args("whole"))
    raft_py(*args("cut"), env={"RAFT_CRASH_AT": "train@2"}, ok=False)
    assert not os.path.exists(tmp_path / "cut" / "stage_0002")
    raft_py(*args("cut"), "--resume")
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith(("time_", "peak_"))} for r in rs]  # noqa: E731
    assert strip(rows(tmp_path / "cut")) == strip(rows(tmp_path / "whole"))
    sel = [open(tmp_path / d / "stage_0002" / "selected.jsonl").read() for d in ("whole", "cut")]
    assert sel[0] == sel[1]
