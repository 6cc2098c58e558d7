"""One tiny ablation sweep end to end: ablate.sh runs every setting for every seed, eval.py --sweep summarises."""

import os
import subprocess

from conftest import tiny_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_sweep_runs_every_setting_and_seed_once(tiny_lm, prompts_file, tmp_path):
    args = tiny_args(tiny_lm, prompts_file, "unused", "--stages", "1")
    i = args.index("--out_dir")
    raft_args = " ".join(args[:i] + args[i + 2 :])
    env = {**os.environ, "SEEDS": "1 2", "OUT": str(tmp_path), "RAFT_ARGS": raft_args, "SCRIPT": "raft.py",
           "TQDM_DISABLE": "1"}  # fmt: skip
    out = subprocess.run(
        ["bash", "ablate.sh", "finetune_from"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for setting in ("current", "base"):
        for seed in (1, 2):
            assert (tmp_path / "finetune_from" / f"{setting}__s{seed}" / "metrics.jsonl").exists()
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| setting | seeds |") and len(table) == 1 + 2  # the header, a row per setting
    assert [row.split(" | ")[0] for row in table[1:]] == ["| base", "| current"]
    assert all(" ± " in row and "| 2 | 1 |" in row for row in table[1:])
    # resumable: running it again skips the finished runs and prints the same table
    again = subprocess.run(
        ["bash", "ablate.sh", "finetune_from"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert [line for line in again.stdout.splitlines() if line.startswith("| ")] == table
    assert again.stdout.count("done, skipped") == 4 and "seed 1 ->" not in again.stdout  # none started again
