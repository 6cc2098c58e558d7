"""The offline demo, run as a user runs it (`python demo.py`, a subprocess), meets its bar: held-out VADER
reward up by ≥ 0.3, distinct-2 ≥ 70% of its stage-0 value, samples and outputs printed, the curve written,
no library progress bars on the console."""

import json
import os
import subprocess
import sys

import pytest

import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.xdist_group("demo")  # one worker builds the demo model for both tests that use it
def test_demo_learns_offline(tmp_path, demo_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    out = subprocess.run(
        [sys.executable, "demo.py", "--demo_dir", demo_dir, "--out_dir", str(tmp_path / "demo")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "demo" / "metrics.jsonl")]
    first, last = rows[0], rows[-1]
    assert len(rows) == 7
    assert last["eval_reward_mean"] >= first["eval_reward_mean"] + 0.3, [r["eval_reward_mean"] for r in rows]
    assert last["eval_distinct_2"] >= 0.7 * first["eval_distinct_2"], [r["eval_distinct_2"] for r in rows]
    assert "held-out samples after stage 0:" in out.stdout and "held-out samples after stage 6:" in out.stdout
    assert f"outputs: {tmp_path / 'demo'}" in out.stdout
    assert (tmp_path / "demo" / "reward_curve.png").stat().st_size > 1000
    # a second run reuses the prepared model instead of pretraining again; without TQDM_DISABLE its console holds
    # the kit's lines and no library progress bars (transformers' "Loading weights", "Writing model shards")
    quiet = {k: v for k, v in env.items() if k != "TQDM_DISABLE"}
    args = [sys.executable, "demo.py", "--demo_dir", demo_dir, "--out_dir", str(tmp_path / "demo2"), "--stages", "1"]
    again = subprocess.run(args, cwd=ROOT, env=quiet, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "building the starting model" not in again.stdout, again.stderr[-3000:]
    assert json.load(open(os.path.join(demo_dir, "model", "recipe.json"))) == demo.REVIEWS_PRETRAIN
    both = again.stdout + again.stderr
    assert "Loading weights" not in both and "Writing model shards" not in both, again.stderr[-2000:]
    assert "stage   1 |" in again.stdout
    assert json.loads(open(tmp_path / "demo2" / "metrics.jsonl").readline()) == {
        **first,
        "time_eval": json.loads(open(tmp_path / "demo2" / "metrics.jsonl").readline())["time_eval"],
    }


def test_a_demo_model_built_with_other_pretraining_settings_is_built_again(tmp_path, capsys):
    d = str(tmp_path / "model")
    assert not demo.built(d, demo.ARITH_PRETRAIN)  # nothing there yet
    os.makedirs(d)
    open(os.path.join(d, "config.json"), "w").write("{}")
    assert not demo.built(d, demo.ARITH_PRETRAIN)  # a model that recorded no settings
    open(os.path.join(d, demo.RECIPE), "w").write(json.dumps(demo.ARITH_PRETRAIN))
    assert demo.built(d, demo.ARITH_PRETRAIN)  # the same settings (through JSON): reused
    assert not demo.built(d, {**demo.ARITH_PRETRAIN, "epochs": 2})
    assert not demo.built(d, demo.REVIEWS_PRETRAIN)
    assert capsys.readouterr().out.count("building it again") == 3


def test_eval_cli_text_metrics(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text("\n".join(json.dumps({"response": r}) for r in ["a b c", "a b d"]) + "\n")
    out = subprocess.run(
        [sys.executable, "eval.py", "--responses", str(f)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    m = json.loads(out.stdout)
    assert m["distinct_2"] == 0.75 and m["unique_1"] == 2 and m["mean_length"] == 3
