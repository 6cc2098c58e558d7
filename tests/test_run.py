"""End-to-end tier: tiny RAFT runs in-process through raft.main, exactly as the command line runs them."""

import json
import math
import os
import re

import pytest
import torch
from conftest import tiny_args
from safetensors.torch import load_file

import raft
import sampling
from data import encode_prompt
from models import build_example, sequence_logprobs

TIME_KEYS = {"time_sample", "time_rank", "time_train", "time_eval"}


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def test_two_stages_write_every_artifact_and_learn_the_kept_set(tiny_lm, prompts_file, tmp_path):
    out = tmp_path / "run"
    rows = raft.main(tiny_args(tiny_lm, prompts_file, out, "--stages", "2"))
    assert [r["stage"] for r in rows] == [0, 1, 2]
    for key in [
        "reward_mean",
        "selected_reward_mean",
        "eval_reward_mean",
        "eval_distinct_2",
        "sft_loss",
        "n_selected",
        "prompts_skipped",
        *TIME_KEYS,
    ]:
        assert all(key in r for r in rows[1:]), key
    assert "eval_reward_mean" in rows[0] and "sft_loss" not in rows[0]
    assert (out / "metrics.jsonl").read_text().count("\n") == 3
    assert (out / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text())["K"] == 4
    for t in (1, 2):
        sel = [json.loads(line) for line in open(out / f"stage_{t:04d}" / "selected.jsonl")]
        assert len(sel) == 8 == rows[t]["n_selected"]
        assert all(set(s) >= {"prompt", "response", "reward", "rewards"} and len(s["rewards"]) == 4 for s in sel)
        assert all(s["reward"] == max(s["rewards"]) for s in sel)  # local ranking keeps the best
        assert rows[t]["selected_reward_mean"] == pytest.approx(sum(s["reward"] for s in sel) / 8)
        assert (out / f"stage_{t:04d}" / "model.safetensors").exists()
    w0, w1 = weights(tiny_lm), weights(out / "stage_0001")
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)

    # fine-tuning on the kept set raised its likelihood: compare the starting model with the stage-1 model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    sel = [json.loads(line) for line in open(out / "stage_0001" / "selected.jsonl")]
    ex = [
        build_example(encode_prompt(tok, s["prompt"]), tok(s["response"], add_special_tokens=False)["input_ids"], None)
        for s in sel
    ]
    lp = [sum(sequence_logprobs(AutoModelForCausalLM.from_pretrained(p), ex, 8)) for p in (tiny_lm, out / "stage_0001")]
    assert lp[1] > lp[0] + 1.0


LEARN = [
    "--stages",
    "4",
    "--lr",
    "1e-2",
    "--K",
    "8",
    "--prompts_per_stage",
    "16",
    "--eval_prompts",
    "16",
    "--train_batch_size",
    "4",
    "--micro_batch_size",
    "4",
    "--epochs",
    "3",
]


def test_reward_rises_over_stages_and_ranking_beats_random(tiny_lm, prompts_file, tmp_path):
    ranked = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "local", *LEARN))
    control = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "random", *LEARN, "--ranking", "random"))
    curve = [r["eval_reward_mean"] for r in ranked]
    assert curve[-1] > curve[0] + 0.3, curve
    # same budget, one random response per prompt instead of the best: the reward does not move like that
    assert control[-1]["eval_reward_mean"] < curve[-1] - 0.2, [r["eval_reward_mean"] for r in control]


def test_resume_gives_the_same_metrics_and_weights(tiny_lm, prompts_file, tmp_path):
    whole = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "a", "--stages", "3"))
    raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "b", "--stages", "1"))
    resumed = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "b", "--stages", "3", "--resume"))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]
    assert strip(resumed) == strip(whole)
    wa, wb = weights(tmp_path / "a" / "stage_0003"), weights(tmp_path / "b" / "stage_0003")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_same_seed_repeats_exactly_and_other_seed_differs(tiny_lm, prompts_file, tmp_path):
    runs = [
        raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / n, "--stages", "1", "--seed", s))
        for n, s in [("a", "1"), ("b", "1"), ("c", "2")]
    ]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]
    assert strip(runs[0]) == strip(runs[1]) != strip(runs[2])


def stage_scores(path, n):
    """The (prompts, responses, rewards) of the reward call that scored n samples (a stage's b·K)."""
    calls = [json.loads(line) for line in open(path)]
    return next(c for c in calls if len(c[0]) == n)


@pytest.mark.parametrize("ranking", ["global", "random"])
def test_other_rankings_select_from_all_of_the_stages_samples(tiny_lm, prompts_file, tmp_path, monkeypatch, ranking):
    """global keeps exactly select()'s top b of all b·K rewards the stage scored (rebuilt from the reward's own log,
    prompts with nothing kept included); random keeps one valid sample per prompt, not always the best."""
    monkeypatch.setenv("RAFT_TEST_SCORES", str(tmp_path / "scores.jsonl"))
    reward = os.path.join(os.path.dirname(__file__), "rewards.py") + ":letters_scored"
    rows = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "r", "--stages", "1", "--ranking", ranking,
                               "--reward", reward))  # fmt: skip
    sel = [json.loads(line) for line in open(tmp_path / "r" / "stage_0001" / "selected.jsonl")]
    assert len(sel) == rows[1]["n_selected"] == 8
    prompts, responses, rewards = stage_scores(tmp_path / "scores.jsonl", 32)
    scores = torch.tensor(rewards).view(8, 4)
    valid = torch.tensor([bool(r) for r in responses]).view(8, 4)
    kept = {(s["prompt"], s["response"]) for s in sel}
    if ranking == "global":
        want = raft.select(scores.masked_fill(~valid, 0.0), valid, "global", torch.Generator())
        assert kept == {(prompts[i * 4 + j], responses[i * 4 + j]) for i, j in want}
    else:
        by_prompt = {}
        for p, r, v in zip(prompts, responses, rewards):
            by_prompt.setdefault(p, []).append((r, v))
        assert len({s["prompt"] for s in sel}) == 8 and all(s["response"] for s in sel)
        assert any(s["reward"] < max(v for _, v in by_prompt[s["prompt"]]) for s in sel)  # not the argmax


def test_kl_beta_ranks_by_the_penalised_score_and_discard_and_stop_strings_hold(tiny_lm, prompts_file, tmp_path):
    """Stage 1 samples from p_0 itself: its KL to the start is exactly 0; after fine-tuning stage 2's is not, and a
    large β keeps other samples than β = 0 does from the same scored samples. Responses matching --discard_regex
    are counted and never kept; a response ends before --stop."""
    args = ["--stages", "2", "--kl_beta", "5", "--stop", "e", "--discard_regex", "a"]
    rows = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "r", *args, "--lr", "1e-2"))
    assert rows[0]["eval_kl_to_start"] == 0.0 and rows[1]["kl_to_start"] == 0.0
    assert abs(rows[2]["kl_to_start"]) > 1e-3 and abs(rows[2]["eval_kl_to_start"]) > 1e-3
    sel = [json.loads(line) for line in open(tmp_path / "r" / "stage_0002" / "selected.jsonl")]
    assert all("e" not in s["response"] and "a" not in s["response"] for s in sel)
    assert rows[1]["samples_discarded"] + rows[2]["samples_discarded"] > 0
    # β = 0: stage 1 is the same (every log-ratio is 0 there), so stage 2 samples the same; only the ranking differs
    raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "b0", *args[:2], *args[4:], "--lr", "1e-2"))
    plain = [json.loads(line) for line in open(tmp_path / "b0" / "stage_0002" / "selected.jsonl")]
    assert [s["rewards"] for s in plain] == [s["rewards"] for s in sel]  # the same samples were scored
    assert [s["response"] for s in plain] != [s["response"] for s in sel]  # but others were kept


def test_generator_model_generates_and_policy_trains(tiny_lm, prompts_file, tmp_path):
    """Distillation (paper Table 8): samples come from another model; the policy trains on the kept ones."""
    from conftest import make_tiny_lm

    teacher = make_tiny_lm(tmp_path / "teacher", seed=7, layers=1, hidden=48)
    rows = raft.main(
        tiny_args(
            tiny_lm,
            prompts_file,
            tmp_path / "d",
            "--stages",
            "1",
            "--generator_model",
            teacher,
            "--temperature",
            "0",
            "--K",
            "1",
        )
    )
    sel = [json.loads(line) for line in open(tmp_path / "d" / "stage_0001" / "selected.jsonl")]
    # greedy K=1 samples of the teacher are exactly what the teacher generates for those prompts
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    got = sampling.generate(
        AutoModelForCausalLM.from_pretrained(teacher).eval(),
        tok,
        [s["prompt"] for s in sel],
        1,
        raft.Config(temperature=0, max_new_tokens=12),
    )
    assert [g[0]["text"] for g in got] == [s["response"] for s in sel]
    w0, w1 = weights(tiny_lm), weights(tmp_path / "d" / "stage_0001")
    assert any(not torch.equal(w0[k], w1[k]) for k in w0) and rows[1]["n_selected"] == len(sel) > 0


def test_finetune_from_base_restarts_each_stage(tiny_lm, prompts_file, tmp_path, monkeypatch):
    """ReST-EM: stage t trains the stage-0 weights (not stage t-1's) on samples of the current model, also after
    --resume."""
    seen = []
    real = raft.finetune

    def spy(model, examples, *a, **kw):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return real(model, examples, *a, **kw)

    monkeypatch.setattr(raft, "finetune", spy)
    raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "b", "--stages", "2", "--finetune_from", "base"))
    w0 = weights(tiny_lm)
    assert len(seen) == 2 and all(torch.equal(s[k], w0[k]) for s in seen for k in w0)
    s1, s2 = weights(tmp_path / "b" / "stage_0001"), weights(tmp_path / "b" / "stage_0002")
    assert any(not torch.equal(s1[k], s2[k]) for k in s1)
    seen.clear()  # after --resume too, stage 3 starts from the stage-0 weights, not from the resumed stage 2
    raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "b", "--stages", "3", "--finetune_from", "base", "--resume"))
    assert len(seen) == 1 and all(torch.equal(seen[0][k], w0[k]) for k in w0)
    seen.clear()
    raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "c", "--stages", "2"))  # current: stage 2 starts at 1
    s1 = weights(tmp_path / "c" / "stage_0001")
    assert all(torch.equal(seen[1][k], s1[k]) for k in s1)


def test_eval_kl_reports_drift_without_changing_the_ranking(tiny_lm, prompts_file, tmp_path):
    a = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "a", "--stages", "1"))
    b = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "b", "--stages", "1", "--eval_kl"))
    # a Monte-Carlo estimate from 8 samples: 0 for the starting model, nonzero once the policy moved
    assert b[0]["eval_kl_to_start"] == pytest.approx(0, abs=1e-4) and abs(b[1]["eval_kl_to_start"]) > 1e-3
    assert "kl_to_start" in b[1] and "kl_to_start" not in a[1]
    assert a[1]["eval_reward_mean"] == b[1]["eval_reward_mean"]


COPY = "raft.py checks.py sampling.py models.py dist.py data.py metrics.py reward.py losses.py".split()


def test_the_files_the_readme_says_to_copy_run_on_their_own(tiny_lm, prompts_file, tmp_path):
    """Copying exactly the README's list into an empty directory runs `python raft.py` there. Without fastgen.py the
    sampler falls back to model.generate, says so once, and on a CPU draws the samples the kit's own run draws."""
    import shutil
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md")).read()
    listed = readme[readme.index("To use the LLM loop in") :].split("add fastgen.py")[0]
    assert sorted(re.findall(r"(\w+\.py)", listed)) == sorted(COPY)
    for name in COPY:
        shutil.copy(os.path.join(root, name), tmp_path / name)
    shutil.copy(os.path.join(root, "tests", "rewards.py"), tmp_path / "my_reward.py")
    args = tiny_args(tiny_lm, prompts_file, tmp_path / "run", "--stages", "1", "--reward", "my_reward.py:letters")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "raft.py", *args], cwd=tmp_path, env={**env, "TQDM_DISABLE": "1"},
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("fastgen.py is not beside sampling.py") == 1, out.stdout[-3000:]
    assert (tmp_path / "run" / "stage_0001" / "selected.jsonl").exists()
    copied = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    mine = ["--stages", "1", "--reward", f"{tmp_path}/my_reward.py:letters"]  # the copy's rewards, with fastgen
    kit = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "kit", *mine))
    for key in ("eval_reward_mean", "reward_mean", "selected_reward_mean"):
        assert [r.get(key) for r in copied] == pytest.approx([r.get(key) for r in kit], abs=1e-6)


def test_clip_with_lora_resumes_exactly_and_runs_on_an_8bit_base(tiny_lm, prompts_file, tmp_path):
    """RAFT++ under LoRA: a resumed run equals an uninterrupted one (π_old is recomputed from the resumed weights);
    on an 8-bit base it runs too. Every stage logs its clipped share and the entropy on the kept samples."""
    pp = ["--loss", "clip", "--advantage", "correct", "--ranking", "positive", "--keep_threshold", "0.1", "--lora_r",
          "4", "--lora_dropout", "0", "--epochs", "3"]  # fmt: skip
    whole = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "a", "--stages", "2", *pp))
    raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "b", "--stages", "1", *pp))
    resumed = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "b", "--stages", "2", "--resume", *pp))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(whole)
    assert all(0 <= r["clip_frac"] <= 1 and r["entropy_kept"] > 0 for r in whole[1:])
    rows = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "c", "--stages", "1", "--load_in_8bit", *pp))
    assert 0 <= rows[1]["clip_frac"] <= 1 and math.isfinite(rows[1]["sft_loss"])
