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


def greedy_args(tiny, out_dir, mode):
    """Two greedy stages (--temperature 0: one and two processes sample the same responses), full or LoRA; learning
    rates at which every stage's held-out samples differ from the last stage's."""
    lm, prompts = tiny
    extra = ["--lora_r", "8", "--lora_dropout", "0", "--lr", "1e-2"] if mode == "lora" else []
    return tiny_args(lm, prompts, out_dir, "--gen_backend", "vllm", "--temperature", "0", "--stages", "2", *extra)


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory):
    """mode -> the run directory of greedy_args in one plain process (made once, on first use)."""
    runs = {}

    def run(mode):
        if mode not in runs:
            runs[mode] = tmp_path_factory.mktemp(f"one_{mode}") / "r"
            raft_py(*greedy_args(tiny, runs[mode], mode))
        return runs[mode]

    return run


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_after_a_stage_the_engine_samples_from_the_new_weights(tiny, one_process, mode):
    """Greedy held-out samples after stages 1 and 2 come from the engine; they equal HF greedy on the saved model of
    that stage (and differ from the stage before, so the weights really moved)."""
    import sampling
    from raft import Config

    lm, run = tiny[0], one_process(mode)
    tok = AutoTokenizer.from_pretrained(lm)
    cfg = Config(temperature=0, max_new_tokens=12, gen_backend="hf")
    evals = [[r["response"] for r in rows(run / f"stage_000{t}", "eval_samples.jsonl")] for t in (0, 1, 2)]
    for t in (1, 2):
        stage = str(run / f"stage_000{t}")
        if mode == "lora":
            from peft import PeftModel

            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm), stage)
        else:
            model = AutoModelForCausalLM.from_pretrained(stage)
        with torch.no_grad():
            hf = sampling.generate(model, tok, [r["prompt"] for r in rows(stage, "eval_samples.jsonl")], 1, cfg)
        assert evals[t] == [s[0]["text"] for s in hf]
        assert evals[t] != evals[t - 1]
    if mode == "lora":  # each rank's engine keeps only the adapters it samples with
        assert os.listdir(run / "vllm" / "rank0") == ["adapter_0003"]


def saved_weights(stage_dir):
    from safetensors.torch import load_file

    (name,) = [f for f in os.listdir(stage_dir) if f.endswith(".safetensors")]  # the model, or the adapters
    return load_file(os.path.join(stage_dir, name))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_under_torchrun_each_rank_has_its_own_engine_and_the_run_ends_where_one_process_ends(
    tiny, one_process, tmp_path, mode
):
    """Two processes under torchrun: each rank's engine is its own (vLLM's worker took the rank's RANK and
    LOCAL_RANK, which pick its GPU and compile cache on a GPU), full fine-tuning pushes FSDP2's weights into every
    rank's engine, LoRA hands each engine its rank's adapters; the stages keep the same sets and end at the same
    weights as in one process, and the processes end without a traceback (the process group is destroyed once)."""
    probe = os.path.join(os.path.dirname(__file__), "torchrun_probe.py")
    args = greedy_args(tiny, tmp_path / "r", mode)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", probe, *args]
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    engines = [json.load(open(tmp_path / "r" / f"engine{r}.json")) for r in (0, 1)]
    assert engines == [{"rank": r, "local_rank": r, "backend": "external_launcher"} for r in (0, 1)]
    one = one_process(mode)
    for t in (1, 2):
        d = f"stage_000{t}"
        assert open(tmp_path / "r" / d / "selected.jsonl").read() == open(one / d / "selected.jsonl").read(), d
        a, b = saved_weights(tmp_path / "r" / d), saved_weights(one / d)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), d
    if mode == "lora":
        assert [os.listdir(tmp_path / "r" / "vllm" / f"rank{r}") for r in (0, 1)] == [["adapter_0003"]] * 2


def test_a_generator_model_samples_the_stages_and_the_policy_is_evaluated(tiny, tmp_path):
    """--generator_model with vllm: the engine holds the generator and samples every stage (it sleeps while the
    policy trains and must wake before the next stage samples: a sleeping engine would never return), and held-out
    evaluation measures the policy, not the generator: greedy, the eval samples equal HF greedy of the saved policy
    of each stage, and the kept responses are the generator's greedy ones."""
    import sampling
    from raft import Config

    lm, prompts = tiny
    gen = make_tiny_lm(tmp_path / "gen", hidden=64, seed=1)
    out = raft_py(*tiny_args(lm, prompts, tmp_path / "r", "--gen_backend", "vllm", "--generator_model", gen,
                             "--temperature", "0", "--stages", "2"))  # fmt: skip
    assert "--gen_backend vllm: the engine computes in float32 (--vllm_dtype auto, on cpu)" in out.stdout
    tok = AutoTokenizer.from_pretrained(lm)
    cfg = Config(temperature=0, max_new_tokens=12, gen_backend="hf")
    with torch.no_grad():
        for t, model in ((0, lm), (2, str(tmp_path / "r" / "stage_0002"))):
            evals = rows(tmp_path / "r" / f"stage_000{t}", "eval_samples.jsonl")
            ps = [r["prompt"] for r in evals]
            policy = sampling.generate(AutoModelForCausalLM.from_pretrained(model), tok, ps, 1, cfg)
            generator = sampling.generate(AutoModelForCausalLM.from_pretrained(gen), tok, ps, 1, cfg)
            assert [r["response"] for r in evals] == [s[0]["text"] for s in policy]
            assert [s[0]["text"] for s in policy] != [s[0]["text"] for s in generator]  # the check can tell
        kept = rows(tmp_path / "r" / "stage_0002", "selected.jsonl")
        generator = sampling.generate(
            AutoModelForCausalLM.from_pretrained(gen), tok, [r["prompt"] for r in kept], 1, cfg
        )
        assert [r["response"] for r in kept] == [s[0]["text"] for s in generator]


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
