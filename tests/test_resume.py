"""Crash safety: a real subprocess killed with SIGKILL at several points (while sampling, scoring, training and
saving), then resumed, ends with the same metrics.jsonl rows and the same final weights as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys

import torch
from conftest import tiny_args
from safetensors.torch import load_file

import raft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(args, crash_at=None):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    env.pop("RAFT_CRASH_AT", None)
    if crash_at:
        env["RAFT_CRASH_AT"] = crash_at
    return subprocess.run(
        [sys.executable, "raft.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def strip(path):
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time_")} for line in open(path)]


def test_killed_anywhere_then_resumed_equals_uninterrupted(tiny_lm, prompts_file, tmp_path):
    raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "ref", "--stages", "3"))  # uninterrupted, in this process
    args = tiny_args(tiny_lm, prompts_file, tmp_path / "run", "--stages", "3")
    first = True
    for point in ["sample@2", "save@2", "train@3", "rank@3"]:
        out = launch(args + ([] if first else ["--resume"]), crash_at=point)
        assert out.returncode == -signal.SIGKILL, (point, out.stderr[-2000:])
        first = False
        if point == "save@2":  # killed after writing the model, before the rename: stage 2 is not complete
            assert (tmp_path / "run" / "stage_0002.tmp").exists() and not (tmp_path / "run" / "stage_0002").exists()
    raft.main(args + ["--resume"])
    assert strip(tmp_path / "run" / "metrics.jsonl") == strip(tmp_path / "ref" / "metrics.jsonl")
    a, b = (load_file(tmp_path / d / "stage_0003" / "model.safetensors") for d in ("ref", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(d.endswith(".tmp") for d in os.listdir(tmp_path / "run"))


def test_keep_last_deletes_old_models_only_after_the_new_one(tiny_lm, prompts_file, tmp_path):
    out = tmp_path / "k"
    # killed while stage 3's model is being written (before its rename): stage 2's model must still be there
    killed = launch(tiny_args(tiny_lm, prompts_file, out, "--stages", "3", "--keep_last", "1"), crash_at="save@3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (out / "stage_0002" / "model.safetensors").exists() and not (out / "stage_0003").exists()
    assert not (out / "stage_0001" / "model.safetensors").exists()  # older than the last one: pruned already
    raft.main(tiny_args(tiny_lm, prompts_file, out, "--stages", "3", "--keep_last", "1", "--resume"))
    assert (
        not (out / "stage_0001" / "model.safetensors").exists()
        and not (out / "stage_0002" / "model.safetensors").exists()
    )
    assert (out / "stage_0003" / "model.safetensors").exists()
    assert all((out / f"stage_{t:04d}" / "selected.jsonl").exists() for t in (1, 2, 3))
    rows = raft.main(tiny_args(tiny_lm, prompts_file, out, "--stages", "4", "--keep_last", "1", "--resume"))
    assert [r["stage"] for r in rows] == [0, 1, 2, 3, 4] and not (out / "stage_0003" / "model.safetensors").exists()
