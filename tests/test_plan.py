"""plan.py rehearses a stage's memory on fake tensors; these tests hold it to real tensors and to arithmetic: the
fake run of a phase and the real run of the same phase count the same bytes, and the CPU allocator (the profiler's
own accounting) agrees; extrapolating over the decoder layers gives the full-depth numbers to the byte; weights,
gradients and AdamW states are what bytes per parameter say for each memory mode and world size; a run that cannot
fit is refused with a change found by planning again; run_a40.sh plans before torchrun and stops on the verdict."""

import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

import models
import plan
import reward
from conftest import make_tiny_rm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.xdist_group("plan")  # one worker: the fake process group and configs are built once


def tiny_config(path, layers=2, **kw):
    """A config.json only (no weights): what the plan loads."""
    conf = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=32, intermediate_size=64,
                num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2, vocab_size=384,
                max_position_embeddings=64, bos_token_id=None, eos_token_id=1, pad_token_id=0, **kw)  # fmt: skip
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(conf, f)
    return str(path)


SMALL = ["--prompts_per_stage", "4", "--K", "2", "--max_new_tokens", "4", "--max_prompt_tokens", "8",
         "--gen_batch_size", "2", "--micro_batch_size", "2", "--train_batch_size", "2", "--eval_prompts", "0",
         "--reward", "tests/rewards.py:letters"]  # fmt: skip


def plan_of(model, *args, only=None):
    cfg, pa = plan.parse(["--model", model, *SMALL, *args])
    return plan.make_plan(cfg, pa, only=only), cfg, pa


def test_extrapolation_over_the_layers_is_exact(tmp_path):
    """A training step planned at 3 and 4 decoder layers and extrapolated to 5 gives the full 5-layer plan's peak to
    the byte, part by part, and its FLOPs and ops: FSDP2 at world size 2 with bf16, two micro-steps (gradients held
    between them). Sampling's extrapolation is checked on SmolLM2's 30 layers (test_smollm.py)."""
    five = tiny_config(tmp_path / "five", layers=5)
    args, only = ["--bf16", "--nproc_per_node", "2", "--train_batch_size", "8"], ["train: fine-tune"]
    ex = plan_of(five, *args, "--depths", "3,4", only=only)[0]["phases"]["train: fine-tune"]
    full = plan_of(five, *args, "--depths", "full", only=only)[0]["phases"]["train: fine-tune"]
    for k in [*plan.PARTS, "peak", "flops", "ops", "region"]:
        assert ex[k] == full[k], k
    for r, p in full["regions"].items():  # the smaller regions too, to 1%
        assert abs(ex["regions"][r]["peak"] - p["peak"]) <= 0.01 * p["peak"], r
    assert {"forward", "backward", "optimizer"} <= set(full["regions"]) and full["peak"] > full["start"]["peak"] > 0


def allocator_peak(fn) -> int:
    """The CPU allocator's own running total during fn, from the profiler's memory events: its highest point."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]  # each (de)allocation
    total = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        total += e.nbytes()
        peak = max(peak, total)
    return peak


def test_fake_and_real_runs_count_the_same_bytes_as_the_allocator(tiny_lm, tmp_path):
    """The same phases on the real tiny models (weights loaded by the kit's loaders, reward.py's reward model without
    a KV cache it would never read) and on fake tensors from their configs:
    the trackers' peaks are equal to the byte, and the CPU allocator's running total over the phase (every
    allocation and free the profiler records with profile_memory) rises by what the tracker counts above the
    resident start, or by at most 1 KiB more: a few host scalars made below the dispatcher, which no TorchDispatchMode
    sees (0 B for sampling and the π_old pass here, 12 B for a training step)."""
    rm_dir = make_tiny_rm(tmp_path / "rm")
    cfg, pa = plan.parse(["--model", tiny_lm, *SMALL, "--reward", rm_dir, "--reward_batch_size", "4"])
    names = ["sample", "rank: reward model", "train: π_old pass", "train: fine-tune"]
    planned = plan.make_plan(cfg, pa, only=names)
    fake, s = planned["phases"], planned["shapes"]
    for name in names:
        runner, _, kw = plan.PHASES[name]
        model, tok = models.load_policy(cfg, torch.device("cpu"))
        model._raft_packing_exact = True  # as planned: the packing check's two extra passes are not a phase
        model._raft_sharing_exact = False  # and as planned, no two samples share a prompt (the worst case)
        rm = reward.load_reward(rm_dir, batch_size=4, device="cpu").model
        for p in rm.parameters():  # bf16 weights as on a GPU (reward.py loads fp32 on a CPU); RoPE's buffer stays fp32
            p.data = p.data.to(torch.bfloat16)
        opt = plan.prime(model, cfg) if name == "train: fine-tune" else None
        m = {"policy": model, "tok": tok, "kl": None, "generator": None, "reward": rm, "opt": opt, "run": model}
        tracker = plan._tracker_class(plan._plain_tracker())()
        tracker.resident(model, opt, rm)
        counter = types.SimpleNamespace(flops=0, ops=0)

        def run(runner=runner, m=m, tracker=tracker, counter=counter, kw=kw):
            with tracker:
                runner(cfg, m, s, tracker, counter, **kw)

        rise = allocator_peak(run)
        peak = max(p["Total"] for p in tracker.peaks.values())
        start = plan._parts(tracker.get_tracker_snapshot().get(torch.device("cpu"), {}))["peak"]
        assert peak == fake[name]["peak"], name
        assert 0 <= rise - (peak - start) <= 1024, (name, rise, peak - start)


def shard_numel(p, world):
    """FSDP2's local shard: dim 0 padded up to a multiple of the world size, then split."""
    return math.ceil(p.shape[0] / world) * (p.numel() // p.shape[0]) if world > 1 else p.numel()


@pytest.mark.parametrize(
    "args, world",
    [([], 1), (["--bf16"], 2), (["--bf16", "--lora_r", "4"], 2), (["--bf16", "--lora_r", "4", "--load_in_8bit"], 1)],
)  # fmt: skip
def test_weights_gradients_and_adamw_are_bytes_per_parameter(tmp_path, args, world):
    """What the plan holds before a training step and at the optimizer step, against bytes per parameter of the
    model's own tensors (a meta-device model from the same config): fp32 full weights (4 B, sharded by FSDP2 over the
    world), a bf16 base under LoRA (2 B) with fp32 adapters, an int8 base (1 B + fp32 row scales, the rest fp32, as
    peft's kbit preparation casts it); gradients 4 B per trained parameter; AdamW 8 B per trained parameter and one
    4-byte step count per tensor. DDP (LoRA at world 2) shards nothing."""
    cfg_dir = tiny_config(tmp_path / "m")
    p = plan_of(cfg_dir, *args, "--nproc_per_node", str(world), only=["train: fine-tune"])[0]["phases"]
    train = p["train: fine-tune"]
    conf = plan.load_config(cfg_dir)
    with torch.device("meta"):
        base = plan.AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16 if "--lora_r" in args else None)
    buffers = sum(b.numel() * b.element_size() for b in base.buffers())  # RoPE's inverse frequencies, whole
    linear = {n for n, m in base.named_modules() if type(m) is torch.nn.Linear and m is not base.lm_head}
    params = dict(base.named_parameters())
    if "--lora_r" in args:
        r = 4
        lora = [(base.get_submodule(n).in_features, base.get_submodule(n).out_features) for n in linear]
        trained = [r * i for i, _ in lora] + [o * r for _, o in lora]
        if "--load_in_8bit" in args:
            weights = sum(params[n + ".weight"].numel() + 4 * base.get_submodule(n).out_features for n in linear)
            weights += 4 * sum(v.numel() for k, v in params.items() if k.rsplit(".", 1)[0] not in linear)
        else:
            weights = 2 * sum(v.numel() for v in params.values())
        weights += 4 * sum(trained)
    else:
        trained = [shard_numel(v, world) for v in params.values()]
        weights = 4 * sum(trained)
    assert train["start"]["weights"] == weights + buffers
    assert train["start"]["optimizer"] == 8 * sum(trained) + 4 * len(trained)
    assert train["regions"]["optimizer"]["grads"] == 4 * sum(trained)
    assert train["start"]["grads"] == 0 and train["fsdp"] == (world > 1 and "--lora_r" not in args)


def test_a_run_that_cannot_fit_is_refused_with_the_change_that_fits(tmp_path):
    """A GPU a byte short of the sampling phase, the largest: the verdict is "does not fit" for sampling alone, and
    the fix found by planning again is a halved --gen_batch_size (checkpointing and the micro-batch, which cannot
    lower sampling, are not tried); below the allowance alone nothing is tried."""
    cfg_dir = tiny_config(tmp_path / "m")
    p, cfg, pa = plan_of(cfg_dir, "--K", "16", "--max_new_tokens", "32", "--gen_batch_size", "4")
    v = plan.verdict(p, cfg, pa)
    totals = {n: r["total"] for n, r in v["rows"].items()}
    assert max(totals, key=totals.get) == "sample"
    pa.gpu_memory_gb = (totals["sample"] - 1) / plan.GB
    v = plan.verdict(p, cfg, pa)
    assert [n for n, r in v["rows"].items() if not r["fits"]] == ["sample"]
    flags, fixed, _, v2 = plan.find_fix(cfg, pa, p, v)
    assert flags == "--gen_batch_size 2" and fixed.gen_batch_size == 2 and v2["fits"]
    pa.gpu_memory_gb = 0.5
    assert plan.find_fix(cfg, pa, p, plan.verdict(p, cfg, pa)) is None


def test_run_a40_plans_first_and_stops_before_torchrun(tmp_path):
    """run_a40.sh runs plan.py on its own command before torchrun; when a phase cannot fit it prints the verdict and
    exits 3 without launching anything; PLAN=0 launches without planning. torchrun here is a stand-in that records
    its call."""
    mark = tmp_path / "launched"
    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" > {mark}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "MODEL": tiny_config(tmp_path / "m"),
           "REWARD": "tests/rewards.py:letters", "NPROC": "2", "B": "2", "K": "1", "MAX_NEW": "2", "GEN_BATCH": "1",
           "MICRO": "1", "TRAIN_BATCH": "2", "EVAL_PROMPTS": "0", "OUT": str(tmp_path / "run"),
           "PYTHON": sys.executable, "PLAN_ARGS": "--gpu_memory_gb 0.5"}  # fmt: skip
    out = subprocess.run(["bash", "run_a40.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 3, out.stderr[-3000:]
    assert "verdict: does not fit in 0.5 GB" in out.stdout and "nothing was launched" in out.stdout
    assert not mark.exists()
    out = subprocess.run(["bash", "run_a40.sh"], cwd=ROOT, env={**env, "PLAN": "0"}, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0 and "raft.py" in mark.read_text() and "--nproc_per_node 2" in mark.read_text()
