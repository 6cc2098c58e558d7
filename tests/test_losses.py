"""The Minimalist family on RAFT's selection (losses.py, raft.finetune): advantages and drops by hand, the three
objectives and their clip, token and sequence averaging, the RL regime's mini-batches and lasting AdamW; the sampling
policy's log-probs (π_old) are the policy that sampled: dropout off, before --finetune_from base resets the weights,
at the sampling temperature, each rank computing its share; the per-stage policy metrics."""

import json
import math

import pytest
import torch
from conftest import PlainSGD, tiny_args

import losses
import models
import raft
from models import build_example
from raft import Config

NAN = float("nan")


def _grid(rewards):
    r = torch.tensor(rewards, dtype=torch.float)
    return r, ~r.isnan()


def test_advantages_and_drops_by_hand():
    r, valid = _grid([[1, 0, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, NAN, 0]])
    keep = [(int(i), int(j)) for i, j in valid.nonzero()]
    adv = lambda mode, **kw: {(i, j): a for i, j, a in losses.advantages(r, valid, keep, mode, 1.0, **kw)[0]}  # noqa
    assert set(adv("one").values()) == {1.0} and len(adv("one")) == 15
    assert adv("correct")[0, 0] == 1.0 and adv("correct")[0, 1] == 0.0 and adv("correct")[2, 3] == 0.0
    assert adv("reinforce")[0, 0] == 1.0 and adv("reinforce")[0, 1] == -1.0 and adv("reinforce")[3, 1] == -1.0
    g = adv("grpo")  # (r - mean) / (unbiased std + 1e-6) over the prompt's valid samples
    s0 = math.sqrt(4 * 0.25 / 3)
    assert g[0, 0] == pytest.approx(0.5 / s0, rel=1e-5) and g[0, 1] == pytest.approx(-0.5 / s0, rel=1e-5)
    assert g[1, 0] == 0.0 and g[2, 0] == 0.0  # all equal: no signal
    s3 = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # prompt 3: the NaN sample is not in the group
    assert g[3, 0] == pytest.approx((2 / 3) / s3, rel=1e-5) and (3, 2) not in g
    _, all_good, no_good = losses.advantages(r, valid, keep, "one", 1.0)
    assert all_good.tolist() == [False, True, False, False] and no_good.tolist() == [False, False, True, False]
    kept = lambda **kw: sorted({i for i, _, _ in losses.advantages(r, valid, keep, "reinforce", 1.0, **kw)[0]})  # noqa
    assert kept() == [0, 1, 2, 3] and kept(drop_all_correct=True) == [0, 2, 3]
    assert kept(drop_all_wrong=True) == [0, 1, 3] and kept(drop_all_correct=True, drop_all_wrong=True) == [0, 3]


def _rank(rewards, **cfg_kw):
    r = torch.tensor(rewards, dtype=torch.float)
    samples = [[{"text": f"s{i}{j}", "ids": [5, 6], "end_id": 2, "reward": float(r[i, j])} for j in range(r.shape[1])]
               for i in range(r.shape[0])]  # fmt: skip
    cfg = Config(K=r.shape[1], **cfg_kw)
    return raft.rank_samples([f"p{i}" for i in range(r.shape[0])], samples, cfg, torch.Generator().manual_seed(0))


def test_best_of_k_keeps_a_wrong_best_sample_and_the_correct_advantage_weighs_it_zero():
    """--ranking local keeps a sample for every prompt, the wrong best one of a prompt with no correct sample too:
    weight 1 in the paper's SFT (--advantage one), 0 under --advantage correct (RAFT++'s A = 1 only if correct)."""
    rewards = [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    rows, kept, m = _rank(rewards, ranking="local")
    assert [(i, a) for i, _, a in kept] == [(0, 1.0), (1, 1.0)] and "advantage" not in rows[0]
    rows, kept, m = _rank(rewards, ranking="local", advantage="correct", loss="clip")
    assert [(i, j, a) for i, j, a in kept] == [(0, 1, 1.0), (1, 0, 0.0)] and rows[1]["advantage"] == 0.0
    assert m["prompts_none_correct"] == 0.5 and m["response_length"] == 2.0
    rows, kept, m = _rank(rewards, ranking="all", advantage="reinforce", drop_all_wrong=True)
    assert [(i, j, a) for i, j, a in kept] == [(0, 0, -1.0), (0, 1, 1.0), (0, 2, -1.0)]


def test_objectives_and_the_asymmetric_clip():
    """Ratios 0.5, 1, 1.25, 1.5 with A = 1: is weighs every token by its ratio (gradient r·A), clip with ε = 0.2 stops
    the gradient above 1.2; with ε_high = 0.28 (DAPO) 1.25 is inside and keeps its gradient; sft is A·log π."""
    for loss, eps_high, grads, held in [("is", 0.2, [0.5, 1, 1.25, 1.5], [False] * 4),
                                        ("clip", 0.2, [0.5, 1, 0, 0], [False, False, True, True]),
                                        ("clip", 0.28, [0.5, 1, 1.25, 0], [False, False, False, True]),
                                        ("sft", 0.2, [1, 1, 1, 1], [False] * 4)]:  # fmt: skip
        lp = torch.tensor([0.5, 1.0, 1.25, 1.5]).log().requires_grad_()
        obj, h = losses.token_objective(lp, torch.zeros(4), torch.ones(4), loss, 0.2, eps_high)
        obj.sum().backward()
        assert lp.grad.tolist() == pytest.approx(grads) and h.tolist() == held, loss


def _examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [build_example([3, 4], torch.randint(4, 60, (n,), generator=g).tolist(), 2) for n in lengths]


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()  # fmt: skip


@pytest.mark.parametrize("agg", ["token", "sequence"])
def test_loss_averages_over_tokens_or_over_sequences(monkeypatch, agg):
    """One SGD step on a short and a long example equals the gradient of the averaged NLL written out by hand: every
    token alike (token), or each sequence's mean first (sequence), with micro-batches of one example."""
    monkeypatch.setattr(torch.optim, "AdamW", PlainSGD)
    exs = _examples([2, 9])
    model, ref = _tiny(), _tiny()
    raft.finetune(model, exs, Config(lr=1.0, epochs=1, train_batch_size=2, micro_batch_size=1, loss_agg=agg,
                                     max_grad_norm=1e9), seed=0)  # fmt: skip
    lps = [models.token_logprobs(ref, [e])[0] for e in exs]
    loss = -torch.cat(lps).mean() if agg == "token" else -torch.stack([lp.mean() for lp in lps]).mean()
    loss.backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p.detach(), q.detach() - q.grad, atol=1e-6)


def test_rl_batches_group_samples_by_prompt():
    prompt_of = [0, 0, 1, 3, 3, 3, 5, 7]  # kept samples of 8 prompts (2, 4, 6 kept nothing)
    steps = losses.rl_batches(prompt_of, 8, 4, torch.Generator().manual_seed(0))
    assert sorted(i for s in steps for i in s) == list(range(8))  # each kept sample once
    assert all(len({prompt_of[i] for i in s}) <= 2 for s in steps) and len(steps) <= 4  # 2 prompts a step
    for s in steps:  # a prompt's samples stay together
        assert all(prompt_of.count(prompt_of[i]) == sum(prompt_of[k] == prompt_of[i] for k in s) for i in s)
    assert (
        losses.rl_batches([0, 1], 8, 4, torch.Generator().manual_seed(0)) != []
        and len(losses.rl_batches([0, 1], 8, 4, torch.Generator().manual_seed(0))) <= 2
    )  # steps without samples are skipped


def _spy(monkeypatch):
    """Record, per stage, every call of raft.token_objective: (lp, old, adv) of each micro-batch."""
    calls, real = [], raft.token_objective
    stage = {"t": 0}
    measure = raft.measure_policy

    def measure_policy(*a, **k):
        stage["t"] += 1
        return measure(*a, **k)

    def token_objective(lp, old, adv, *rest):
        calls.append((stage["t"], lp.detach().clone(), None if old is None else old.clone(), adv.clone()))
        return real(lp, old, adv, *rest)

    monkeypatch.setattr(raft, "measure_policy", measure_policy)
    monkeypatch.setattr(raft, "token_objective", token_objective)
    return calls


def _first_ratio(calls, t):
    lp, old = next((lp, old) for s, lp, old, _ in calls if s == t)[:2]
    return (lp - old).exp()


def test_pi_old_is_the_sampling_policy_under_lora_dropout(tiny_lm, prompts_file, tmp_path, monkeypatch):
    """From stage 2 on the LoRA adapters are non-zero, so dropout would change the training forward: the ratio of the
    first step to π_old is still exactly 1 (dropout is off in both), at the sampling temperature too."""
    calls = _spy(monkeypatch)
    raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "run", "--stages", "2", "--lora_r", "4", "--lora_dropout",
                        "0.5", "--loss", "clip", "--temperature", "0.7", "--lr", "5e-2"))  # fmt: skip
    for t in (1, 2):
        assert torch.allclose(_first_ratio(calls, t), torch.ones(1), atol=1e-5), t
    assert not torch.allclose(calls[-1][1], calls[-1][2], atol=1e-4)  # the policy did move within the stage


def test_pi_old_is_taken_before_finetune_from_base_resets_the_weights(tiny_lm, prompts_file, tmp_path, monkeypatch):
    """--finetune_from base: stage 2 samples from the stage-1 model, then training restarts from stage 0. π_old must
    be the stage-1 model's log-probs, so the first ratio (π_base / π_stage1) is not 1; computed after the reset it
    would be exactly 1."""
    calls = _spy(monkeypatch)
    rows = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "run", "--stages", "2", "--finetune_from", "base",
                               "--loss", "clip", "--lr", "5e-2", "--epochs", "2"))  # fmt: skip
    assert torch.allclose(_first_ratio(calls, 1), torch.ones(1), atol=1e-5)  # stage 1: base = the sampler
    assert (_first_ratio(calls, 2) - 1).abs().max() > 1e-3
    assert rows[2]["entropy_kept"] > 0


def test_policy_pass_at_a_temperature_matches_a_direct_computation():
    model, exs = _tiny(), _examples([3, 5, 2, 7])
    old, per = models.policy_pass(model, exs, 2, temperature=0.5, spread=False)
    with torch.no_grad():
        for (x, y), lp, (ent, n, kl) in zip(exs, old, per):
            logp = (model(input_ids=torch.tensor([x])).logits[0].float() / 0.5).log_softmax(-1)
            at = [j for j in range(len(x) - 1) if y[j + 1] != -100]
            assert torch.allclose(lp, torch.tensor([logp[j, y[j + 1]].item() for j in at]), atol=1e-5)
            assert ent == pytest.approx(sum(-(logp[j].exp() * logp[j]).sum().item() for j in at), abs=1e-4)
            assert n == len(at) and kl == 0.0


def test_policy_pass_computes_only_this_ranks_share(monkeypatch):
    """Under torchrun each rank runs the forward on every WORLD-th example and the results are gathered: rank 1 of 2
    computes examples 1 and 3 (here the gather returns them alone)."""
    model, exs = _tiny(), _examples([3, 5, 2, 7])
    monkeypatch.setattr(models, "RANK", 1)
    monkeypatch.setattr(models, "WORLD", 2)
    monkeypatch.setattr(models, "gather", lambda items: items)
    seen = []
    real = models.token_logprobs
    monkeypatch.setattr(models, "token_logprobs", lambda m, e, *a, **k: seen.extend(e) or real(m, e, *a, **k))
    old, per = models.policy_pass(model, exs, 8)
    assert seen == [exs[1], exs[3]] and len(old) == len(per) == 2
    alone, _ = models.policy_pass(model, exs, 8, spread=False)
    assert torch.allclose(old[0], alone[1], atol=1e-6) and torch.allclose(old[1], alone[3], atol=1e-6)


def test_rl_regime_takes_mini_batch_steps_keeps_adamw_and_resumes_exactly(tiny_lm, prompts_file, tmp_path,
                                                                          monkeypatch):  # fmt: skip
    """--regime rl: --mini_batches optimizer steps per stage at a constant rate, one AdamW across stages (its step
    count goes on); entropy over every sample and the low-variance KL to stage 0 are logged (0 at stage 1, whose
    samples come from the stage-0 model); a resumed run, which reloads the saved AdamW, equals an uninterrupted one."""
    steps = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        out = real_step(self, *a, **k)
        steps.append((self.param_groups[0]["lr"], max(s["step"].item() for s in self.state.values())))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    rl = ["--regime", "rl", "--mini_batches", "2", "--ranking", "all", "--advantage", "grpo", "--loss", "clip",
          "--eval_kl", "--temperature", "0.8"]  # fmt: skip
    whole = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "a", "--stages", "2", *rl))
    assert [s for _, s in steps] == [1, 2, 3, 4] and {lr for lr, _ in steps} == {1e-3}
    assert whole[1]["kl_low_var"] == pytest.approx(0.0, abs=1e-6) and whole[2]["kl_low_var"] > 0
    assert all(r["entropy"] > 0 and 0 <= r["clip_frac"] <= 1 and r["response_length"] > 0 for r in whole[1:])
    raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "b", "--stages", "1", *rl))
    steps.clear()
    resumed = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "b", "--stages", "2", "--resume", *rl))
    assert [s for _, s in steps] == [3, 4]  # the saved AdamW went on counting
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(whole)
    saved = json.loads((tmp_path / "a" / "stage_0002" / "metrics.json").read_text())
    assert saved["entropy"] == whole[2]["entropy"] and (tmp_path / "a" / "stage_0002" / "optimizer.pt").exists()


def test_bad_combinations_are_one_line_errors(tiny_lm, prompts_file, tmp_path):
    for extra, msg in [(["--loss", "raftpp"], "--loss clip --advantage correct"),
                       (["--regime", "rl", "--finetune_from", "base"], "--regime rl keeps its AdamW"),
                       (["--advantage", "ppo"], "--advantage 'ppo': choose one of"),
                       (["--mini_batches", "0"], "--mini_batches must be ≥ 1")]:  # fmt: skip
        with pytest.raises(SystemExit, match=msg):
            raft.parse(tiny_args(tiny_lm, prompts_file, tmp_path / "x", *extra))


def _measured(monkeypatch):
    """How many examples each call of the policy's separate pass (metrics.policy_pass) measured."""
    import metrics

    calls, real = [], metrics.policy_pass
    monkeypatch.setattr(metrics, "policy_pass", lambda m, exs, *a, **k: calls.append(len(exs)) or real(m, exs, *a, **k))
    return calls


ONE_STEP = ["--regime", "rl", "--mini_batches", "1", "--ranking", "all", "--advantage", "grpo", "--loss", "clip",
            "--temperature", "0.8", "--eval_prompts", "0", "--stages", "2", "--lr", "0.3"]  # fmt: skip


def test_a_single_step_takes_pi_old_and_the_entropy_from_its_own_forward(tiny_lm, prompts_file, tmp_path, monkeypatch):
    """One optimizer step per sampled batch from the weights that sampled: the ratio to π_old is identically 1, so
    π_old is the step's own detached log-probs (as TRL and verl) and the same forward measures the entropy; the
    separate pass measures only what does not train (here: empty responses). Losses, metrics and weights after each
    step (plain SGD: w − lr·g, so the gradients themselves) equal the separate pass's, forced as before."""
    import metrics
    from safetensors.torch import load_file

    monkeypatch.setattr(torch.optim, "AdamW", PlainSGD)
    calls = _measured(monkeypatch)
    fused = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "fused", *ONE_STEP))
    fused_calls = list(calls)
    calls.clear()
    monkeypatch.setattr(metrics, "single_step", lambda cfg, n: False)
    apart = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "apart", *ONE_STEP))
    assert sum(calls) == 2 * 8 * 4  # before: every sample, every stage
    assert sum(fused_calls) == sum(8 * 4 - r["n_selected"] for r in fused[1:]) < sum(calls)
    for a, b in zip(fused[1:], apart[1:]):
        for key in ("sft_loss", "entropy", "entropy_kept", "clip_frac", "reward_mean", "response_length"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert fused[2]["clip_frac"] == 0.0 and fused[2]["reward_mean"] != fused[1]["reward_mean"]  # the policy moved
    for t in (1, 2):
        w = [load_file(tmp_path / run / f"stage_{t:04d}" / "model.safetensors") for run in ("fused", "apart")]
        assert all(torch.allclose(w[0][k], w[1][k], atol=1e-6) for k in w[0]), t


@pytest.mark.parametrize(
    "extra",
    [
        ["--mini_batches", "2"],  # two steps: the second one's ratio is not 1
        ["--finetune_from", "base", "--regime", "raft", "--epochs", "1", "--train_batch_size", "32"],  # a reset
        ["--eval_kl"],  # the low-variance KL needs the policy's and the reference's log-probs side by side
        ["--regime", "raft", "--epochs", "2"],
        ["--regime", "raft", "--epochs", "1", "--train_batch_size", "8"],  # 8 of up to 32 kept samples per step
        ["--loss", "sft", "--lora_r", "4", "--lora_dropout", "0.5"],  # dropout in the update's forward
    ],
)
def test_the_separate_pass_stays_where_the_update_cannot_measure_the_sampling_policy(
    tiny_lm, prompts_file, tmp_path, monkeypatch, extra
):
    calls = _measured(monkeypatch)
    rows = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "run", *ONE_STEP, "--stages", "1", *extra))
    measured = 8 * 4 if "raft" not in extra else rows[1]["n_selected"]  # the RL regime measures every sample
    assert sum(calls) == measured and rows[1]["entropy_kept"] > 0


def test_the_paper_regime_with_one_step_measures_in_the_update(tiny_lm, prompts_file, tmp_path, monkeypatch):
    """--regime raft --epochs 1 with every kept sample in one batch: no separate pass at all."""
    calls = _measured(monkeypatch)
    rows = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "run", "--epochs", "1", "--train_batch_size", "8",
                               "--stages", "1", "--eval_prompts", "0"))  # fmt: skip
    assert calls == [] and rows[1]["entropy_kept"] > 0
