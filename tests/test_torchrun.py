"""torchrun tier: two CPU processes over gloo, launched by subprocess as a user would launch them."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_args

import data
import raft

HERE = os.path.dirname(os.path.abspath(__file__))


def torchrun(args, env_extra=None, script=os.path.join(HERE, "ddp_probe.py"), ok=True, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **(env_extra or {})}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert (out.returncode == 0) == ok, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def check_ranks(out_dir, log_dir, b):
    # each rank scored its own shard of the stage's prompts: disjoint, and together the whole batch
    calls = {r: [json.loads(line) for line in open(log_dir / f"rank{r}.jsonl")] for r in (0, 1)}
    # per rank: stage-0 eval, stage-1 samples (K copies of each prompt), stage-1 eval
    stage1 = {r: set(calls[r][1]) for r in (0, 1)}
    selected = {json.loads(line)["prompt"] for line in open(out_dir / "stage_0001" / "selected.jsonl")}
    assert not stage1[0] & stage1[1] and len(stage1[0]) == len(stage1[1]) == b // 2
    assert stage1[0] | stage1[1] == selected  # local ranking kept one response for every prompt
    w0, w1 = (torch.load(out_dir / f"rank{r}.pt") for r in (0, 1))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)  # identical after the stage


GREEDY_RAFTPP = ["--temperature", "0", "--loss", "clip"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_lm, prompts_file, tmp_path_factory):
    """Two stages in one plain process, greedy (--temperature 0), so 1 and 2 processes sample the same responses
    and keep the same sets: the reference a resumed run must end at."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    raft.main(tiny_args(tiny_lm, prompts_file, out, *GREEDY_RAFTPP, "--stages", "2"))
    return out


def same_stage(a, b, stage, atol=1e-5):
    """Stage `stage` of two runs: the same kept set and the same weights up to float rounding. Returns a's weights."""
    d = f"stage_{stage:04d}"
    assert open(a / d / "selected.jsonl").read() == open(b / d / "selected.jsonl").read(), d
    wa, wb = saved_weights(a / d), saved_weights(b / d)
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=atol) for k in wa), d
    return wa


@pytest.mark.xdist_group("uninterrupted")  # one worker computes the reference run
def test_fsdp_full_and_ddp_lora_two_ranks_then_resume_on_one(tiny_lm, prompts_file, tmp_path, uninterrupted):
    # RAFT++'s loss here (SFT's is checked against one process below): its π_old and clip run under FSDP2 and DDP too
    for mode, extra in [("full", GREEDY_RAFTPP), ("lora", ["--lora_r", "4", "--loss", "clip"])]:
        out, log = tmp_path / mode, tmp_path / f"log_{mode}"
        log.mkdir()
        args = tiny_args(tiny_lm, prompts_file, out, "--stages", "1", *extra)
        args[args.index("--reward") + 1] = f"{HERE}/rewards.py:letters_logged"  # letters, and who scored what
        torchrun(args, {"RAFT_TEST_LOG": str(log)})
        check_ranks(out, log, 8)
        assert 0 <= json.loads(open(out / "stage_0001" / "metrics.json").read())["clip_frac"] <= 1
        # full fine-tuning is sharded with FSDP2, LoRA replicated under DDP (one wrapper per fine-tune call)
        engines = [torch.load(out / f"rank{r}.mode.pt") for r in (0, 1)]
        assert engines == [{"fsdp": mode == "full", "ddp": 0 if mode == "full" else 1}] * 2
        if mode == "full":  # a 2-rank checkpoint resumes on 1 process and ends where one uninterrupted process ends
            rows = raft.main(
                tiny_args(tiny_lm, prompts_file, out, *extra, "--stages", "2", "--resume", "--resume_force")
            )
            assert [r["stage"] for r in rows] == [0, 1, 2]
            for stage in (1, 2):
                same_stage(out, uninterrupted, stage)


def saved_weights(stage_dir):
    from safetensors.torch import load_file

    files = [f for f in os.listdir(stage_dir) if f.endswith(".safetensors")]
    assert len(files) == 1, files
    return load_file(os.path.join(stage_dir, files[0]))


def test_torchrun_with_one_process_uses_the_engines_and_matches_a_plain_run(tiny_lm, prompts_file, tmp_path):
    """`torchrun --nproc_per_node 1` (the world-size-1 check of a GPU node) trains through FSDP2 (full) and DDP
    (LoRA) like 8 ranks would, and a stage ends where a plain `python raft.py` run ends: same kept set, same
    weights up to float rounding."""
    for mode, extra in [("full", []), ("lora", ["--lora_r", "4"])]:
        args = ["--stages", "1", *extra]
        torchrun(tiny_args(tiny_lm, prompts_file, tmp_path / f"tr_{mode}", *args), nproc=1)
        assert torch.load(tmp_path / f"tr_{mode}" / "rank0.mode.pt") == {
            "fsdp": mode == "full",
            "ddp": 0 if mode == "full" else 1,
        }
        raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / f"plain_{mode}", *args))
        a = same_stage(tmp_path / f"tr_{mode}", tmp_path / f"plain_{mode}", 1)
        start = saved_weights(tiny_lm) if mode == "full" else None
        assert start is None or any(not torch.equal(a[k], start[k]) for k in a)  # and the stage did train


def run_a40(**env):
    return subprocess.run(
        ["bash", "run_a40.sh"],
        cwd=os.path.dirname(HERE),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DRY_RUN": "1", "MODEL": "my/llama-7b-sft", **env},
    )


def test_run_a40_dry_run_resolves_the_paper_config():
    out = run_a40(K="32")
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = json.loads(out.stdout)
    assert (cfg["model"], cfg["dataset"], cfg["reward"]) == (
        "my/llama-7b-sft",
        "Dahoas/full-hh-rlhf",
        ["weqweasdas/hh_rlhf_rm_open_llama_3b"],
    )
    assert (
        cfg["K"],
        cfg["prompts_per_stage"],
        cfg["temperature"],
        cfg["lr"],
        cfg["epochs"],
        cfg["max_new_tokens"],
        cfg["top_k"],
        cfg["top_p"],
    ) == (32, 2048, 1.0, 2e-5, 2, 128, 0, 1.0)
    assert cfg["bf16"] and cfg["lora_r"] == 0 and cfg["world_size"] == 8 and cfg["prompts_per_rank"] == 256
    small = json.loads(run_a40(MODE="8bit", NPROC="4").stdout)
    assert small["load_in_8bit"] and small["lora_r"] == 16 and small["gradient_checkpointing"] and small["bf16"]
    assert small["reward_load_in_8bit"]
    bad = run_a40(B="2047")
    assert bad.returncode != 0 and "multiple of 8" in bad.stderr
    assert run_a40(MODE="fast").returncode == 2


def test_a_torchrun_worker_ends_after_atexit_without_interpreter_shutdown():
    """dist.exit_worker, the last call of every entry point: under torchrun it runs the atexit handlers, flushes
    stdout and ends the process before Python's shutdown (where a gloo thread still freeing tensors would abort it);
    in a plain process it does nothing."""
    code = (
        "import atexit, dist\n"
        "class Late:\n"
        "    def __del__(self): print(' shutdown ran', flush=True)\n"
        "late = Late()  # a module global: freed by the interpreter's shutdown only\n"
        "atexit.register(lambda: print(' atexit ran', flush=True))\n"
        "print('buffered', end='')  # not flushed: exit_worker must flush it\n"
        "dist.exit_worker()\n"
        "print(' returned', end='')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "TORCHELASTIC_RUN_ID", "WORLD_SIZE")}
    root = os.path.dirname(HERE)
    worker = subprocess.run([sys.executable, "-c", code], cwd=root, env={**env, "TORCHELASTIC_RUN_ID": "t"},
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (worker.returncode, worker.stdout) == (0, "buffered atexit ran\n"), worker.stderr[-2000:]
    plain = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert (plain.returncode, plain.stdout) == (0, "buffered returned atexit ran\n shutdown ran\n"), plain.stderr


def test_sft_only_under_torchrun_saves_a_full_model(tiny_lm, tmp_path):
    """--sft_only on 2 ranks (FSDP2): the saved model is a whole HF model that loads in one process."""
    fixture = os.path.join(HERE, "fixtures", "hh_rlhf.jsonl")
    torchrun(
        [
            "--model",
            tiny_lm,
            "--dataset",
            fixture,
            "--out_dir",
            str(tmp_path / "sft"),
            "--epochs",
            "1",
            "--lr",
            "1e-3",
            "--train_batch_size",
            "4",
            "--micro_batch_size",
            "2",
            "--device",
            "cpu",
        ],
        script=os.path.join(os.path.dirname(HERE), "sft.py"),
    )
    from transformers import AutoModelForCausalLM

    sft = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    assert sft.state_dict().keys() == base.state_dict().keys()
    assert any(not torch.equal(sft.state_dict()[k], base.state_dict()[k]) for k in base.state_dict())


@pytest.mark.xdist_group("demo")  # with test_demo: the demo model is built once
def test_the_headline_command_runs_on_8_processes(tmp_path, demo_dir):
    """`torchrun --nproc_per_node 8 raft.py` (the card's command: full fine-tuning, sharded by FSDP2) with the demo's
    model, data and settings, and `torchrun --nproc_per_node 2 demo.py` (the demo, typed so) under LoRA: any number
    of processes that divides the global batch works."""
    import demo

    root = os.path.dirname(HERE)
    for mode, script, nproc in [("full", "raft.py", 8), ("lora", "demo.py", 2)]:
        args = ["--stages", "1", "--out_dir", str(tmp_path / mode)]
        if script == "demo.py":
            args += ["--demo_dir", demo_dir, "--lora_r", "8"]
        else:
            args = demo.raft_args("reviews", demo_dir, args)
        out = torchrun(args, script=os.path.join(root, script), nproc=nproc)
        rows = [json.loads(line) for line in open(tmp_path / mode / "metrics.jsonl")]
        assert [r["stage"] for r in rows] == [0, 1] and rows[1]["n_selected"] == 64, out.stdout[-2000:]
        assert out.stdout.count("stage   1 |") == 1  # printed once, by rank 0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_rank_globally_as_one_process(tiny_lm, prompts_file, tmp_path):
    """Two "nodes" of one process each (two torchrun launches, --nnodes 2, a c10d rendezvous on localhost; the second
    node's process has rank 1 and local rank 0) sharing one run directory, with --ranking global: the top b of b·K
    over both nodes' samples is the set one plain process keeps (greedy samples and a reward of the prompt alone),
    several from the best prompts, and the weights are that process's."""
    args = ["--stages", "1", "--ranking", "global", "--temperature", "0", "--reward",
            f"{HERE}/rewards.py:prompt_length"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    rdzv = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_id", "raft-test",
            "--rdzv_endpoint", f"127.0.0.1:{free_port()}"]  # fmt: skip
    script = os.path.join(os.path.dirname(HERE), "raft.py")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *rdzv, "--node_rank", str(n), script,
                               *tiny_args(tiny_lm, prompts_file, tmp_path / "two", *args)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in (0, 1)]  # fmt: skip
    for p in nodes:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "one", *args))
    same_stage(tmp_path / "two", tmp_path / "one", 1)
    sel = [json.loads(line) for line in open(tmp_path / "two" / "stage_0001" / "selected.jsonl")]
    assert len(sel) == 8 and len({s["prompt"] for s in sel}) < 8  # global: several from the best prompts


def test_two_ranks_train_exactly_as_one_process_on_the_same_global_batch(tiny_lm, tmp_path):
    """One plain-SGD step on a fixed batch of 7 rows: 2 ranks (FSDP2 for full fine-tuning, DDP for LoRA, unequal
    shares) give the weights of 1 process. Ranks that merely agree with each other (each training on the same half,
    or a gradient scaled by the world size) would fail this."""
    from finetune_probe import one_step

    torchrun([tiny_lm, str(tmp_path), "full", "lora"], script=os.path.join(HERE, "finetune_probe.py"))
    for mode in ("full", "lora"):
        two, one = torch.load(tmp_path / f"{mode}.pt"), one_step(mode, tiny_lm, shard=False)
        assert two.keys() == one.keys() and len(one) > 0
        assert all(torch.allclose(two[k], one[k], atol=1e-6) for k in one), mode
        base = saved_weights(tiny_lm)  # and the step did move the weights
        moved = [not torch.equal(one[k], base[k]) for k in base if k in one] if mode == "full" else \
            [bool(v.abs().sum() > 0) for k, v in one.items() if "lora_B" in k]  # fmt: skip
        assert moved and any(moved)


def test_a_rank_dying_ends_the_job_and_the_rl_regime_resumes_its_adamw(tiny_lm, prompts_file, tmp_path):
    """--regime rl, full fine-tuning on 2 ranks (FSDP2). Rank 1 is SIGKILLed while training stage 2: torchrun ends
    the whole job (no hang: the timeout would fail the test) and reports the failure, and stage 1's sharded AdamW
    was gathered into its optimizer.pt. --resume under torchrun continues from stage 1, the last completed one,
    loads that state back into its shards and ends where one plain process ends (greedy, so both sample the same
    responses): the same kept sets, weights and held-out rewards."""
    rl = ["--temperature", "0", "--regime", "rl", "--mini_batches", "2", "--ranking", "all", "--loss", "clip"]
    args, script = tiny_args(tiny_lm, prompts_file, tmp_path / "r", "--stages", "2", *rl), os.path.join(
        os.path.dirname(HERE), "raft.py")  # fmt: skip
    out = torchrun(args, {"RAFT_CRASH_AT": "train@2:1"}, script=script, ok=False)
    assert "Signal 9" in out.stderr or "SIGKILL" in out.stderr
    assert data.completed_stages(tmp_path / "r") == [0, 1]
    assert set(torch.load(tmp_path / "r" / "stage_0001" / "optimizer.pt", weights_only=True)["state"])  # all of it
    out = torchrun(args + ["--resume"], script=script)
    assert "resuming after stage 1" in out.stdout
    ref = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "one", "--stages", "2", *rl))
    rows = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    assert [r["stage"] for r in rows] == [0, 1, 2]
    for stage in (1, 2):
        same_stage(tmp_path / "r", tmp_path / "one", stage)
    assert [r["eval_reward_mean"] for r in rows] == pytest.approx([r["eval_reward_mean"] for r in ref], abs=1e-6)
