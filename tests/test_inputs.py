"""Bad input gets a one-line error that names the input and the fix (SystemExit, before models load where possible),
or a counted skip; and the reward loaders (callables, a sequence-classification model)."""

import json
import os

import pytest
import torch
from conftest import docs_text, make_tiny_rm, tiny_args
from safetensors.torch import load_file

import checks
import raft
from reward import load_reward, score

HERE = os.path.dirname(os.path.abspath(__file__))


def fails(argv, *needles):
    with pytest.raises(SystemExit) as e:
        raft.main(argv)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_config_errors_name_the_flag(tiny_lm, prompts_file, tmp_path):
    fails(tiny_args(tiny_lm, prompts_file, tmp_path / "a", "--K", "0"), "--K")
    fails(tiny_args(tiny_lm, prompts_file, tmp_path / "a", "--ranking", "best"), "--ranking")
    fails(tiny_args(tiny_lm, prompts_file, tmp_path / "a", "--discard_regex", "(["), "--discard_regex")
    fails(tiny_args(tiny_lm, prompts_file, tmp_path / "a", "--eval_prompts", "100"), "--eval_prompts")
    fails(tiny_args(str(tmp_path / "nope"), prompts_file, tmp_path / "b"), "--model", "nope")
    fails(tiny_args(tiny_lm, prompts_file, tmp_path / "a", "--gen_backend", "vllm"), "--gen_backend")
    fails(tiny_args(tiny_lm, prompts_file, tmp_path / "a", "--gen_dequantized"), "--gen_dequantized", "--load_in_8bit")


def test_dataset_errors(tiny_lm, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    fails(tiny_args(tiny_lm, str(bad), tmp_path / "a"), "line 2", "'prompt'", "--prompt_field")
    bad.write_text(json.dumps({"prompt": 3}) + "\n")
    fails(tiny_args(tiny_lm, str(bad), tmp_path / "b"), "line 1")


def test_out_dir_is_never_overwritten_and_resume_checks_config(tiny_lm, prompts_file, tmp_path):
    raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "r", "--stages", "1"))
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    fails(tiny_args(tiny_lm, prompts_file, tmp_path / "r", "--stages", "1"), "not empty", "--resume")
    fails(tiny_args(tiny_lm, prompts_file, tmp_path / "r", "--stages", "2", "--K", "2", "--resume"), "'K'")
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize(
    "fn,needle",
    [("wrong_length", "returned 9 values for 8"), ("raises", "reward server down"), ("not_numbers", "not a number")],
)
def test_bad_reward_callables(tiny_lm, prompts_file, tmp_path, fn, needle):
    fails(tiny_args(tiny_lm, prompts_file, tmp_path / "a", "--reward", f"{HERE}/rewards.py:{fn}"), needle)


def test_reward_spec_errors():
    with pytest.raises(SystemExit, match="no function"):
        load_reward(f"{HERE}/rewards.py:missing")
    with pytest.raises(SystemExit, match="does not exist"):
        load_reward("missing_file.py:f")
    with pytest.raises(SystemExit, match="cannot import"):
        load_reward("no_such_module_xyz:f")


def test_nan_rewards_are_skipped_and_counted(tiny_lm, prompts_file, tmp_path):
    rows = raft.main(
        tiny_args(tiny_lm, prompts_file, tmp_path / "a", "--stages", "1", "--reward", f"{HERE}/rewards.py:nan_for_odd")
    )
    assert rows[1]["samples_nan_reward"] == 16 and rows[1]["n_selected"] == 8
    v = score(lambda p, r: [1, float("inf"), "2"], ["a"] * 3, ["b"] * 3)
    assert v[0] == 1.0 and v[1] != v[1] and v[2] == 2.0  # inf comes back as NaN


def test_reward_model_batched_equals_one_at_a_time(tmp_path):
    make_tiny_rm(tmp_path / "rm")  # seed 0, 64 positions: the same model as written out here before
    prompts = ["###Human: hi ###Assistant:", "###Human: a much longer question here ###Assistant:", "x"]
    responses = [" hello", " short", " a response that is rather long" * 3]
    fn = load_reward(str(tmp_path / "rm"), template="{prompt}{response}", batch_size=2)
    batched = fn(prompts, responses)
    alone = [fn([p], [r])[0] for p, r in zip(prompts, responses)]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(round(v, 6) for v in batched)) == 3  # real, distinct scores in the input order


def test_docs_document_every_option_and_metric(tiny_lm, prompts_file, tmp_path):
    import dataclasses

    readme = docs_text()
    missing = [f.name for f in dataclasses.fields(raft.Config) if f"`--{f.name}`" not in readme]
    assert not missing, f"options not in the docs: {missing}"
    for f in dataclasses.fields(raft.Config):
        assert f.metadata.get("help"), f"--{f.name} has no help text"
    rows = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "r", "--stages", "1", "--kl_beta", "0.1"))
    keys = set(rows[0]) | set(rows[1])
    assert not [k for k in keys if f"`{k}`" not in readme], "metrics not in the docs"


def write_jsonl(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return str(path)


def test_duplicates_and_too_long_prompts_are_dropped_and_counted(tiny_lm, tmp_path, capsys):
    prompts = [f"prompt number {i}" for i in range(40)] + ["prompt number 1"] * 5 + ["x" * 300] * 2
    raft.main(
        tiny_args(
            tiny_lm,
            write_jsonl(tmp_path / "d.jsonl", prompts),
            tmp_path / "r",
            "--stages",
            "1",
            "--max_prompt_tokens",
            "100",
        )
    )
    out = capsys.readouterr().out
    assert "dropped 6 duplicate prompts" in out and "dropped 1 of 41 prompts longer than 100 tokens" in out


def test_dataset_empty_after_filtering(tiny_lm, prompts_file, tmp_path):
    fails(
        tiny_args(tiny_lm, prompts_file, tmp_path / "r", "--max_prompt_tokens", "2"),
        "usable prompts",
        "after dropping",
        "--eval_prompts",
    )


def test_every_sample_discarded_is_a_logged_skip(tiny_lm, prompts_file, tmp_path, capsys):
    rows = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "r", "--stages", "1", "--discard_regex", "."))
    assert rows[1]["n_selected"] == 0 and rows[1]["sft_loss"] is None and rows[1]["prompts_skipped"] == 8
    assert "every sample was discarded" in capsys.readouterr().out
    w0 = load_file(os.path.join(tiny_lm, "model.safetensors"))
    w1 = load_file(tmp_path / "r" / "stage_0001" / "model.safetensors")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # nothing trained, nothing changed


def test_tokenizer_without_pad_token(tmp_path, prompts_file):
    """No pad token (many causal LMs): EOS pads, an ended sample's EOS is still trained, left-padded batches sample
    what each prompt alone samples (greedy, both backends), and a run finishes."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    import models
    import sampling
    from demo import train_demo_tokenizer

    tok = train_demo_tokenizer(["some text to learn a few merges from"] * 4, vocab_size=300)
    tok.pad_token = None
    assert tok.pad_token_id is None and models.pad_id(tok) == tok.eos_token_id
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ended = {"ids": tok("some text", add_special_tokens=False)["input_ids"], "end_id": tok.eos_token_id}
    x, y = models.example(tok, "learn", ended)
    assert y[-1] == x[-1] == tok.eos_token_id  # the EOS that ended it is a label ...
    lp, seg, _ = models.token_logprobs(model, [(x, y)])
    assert len(lp) == len(ended["ids"]) + 1  # ... and gets a loss term
    prompts = ["learn", "some text to learn a few", "a few merges"]
    for backend in ("fast", "hf"):
        cfg = raft.Config(temperature=0, max_new_tokens=8, gen_batch_size=3, gen_backend=backend)
        batched = sampling.generate(model, tok, prompts, 1, cfg)
        assert batched == [sampling.generate(model, tok, [p], 1, cfg)[0] for p in prompts], backend
    rows = raft.main(tiny_args(str(tmp_path / "m"), prompts_file, tmp_path / "r", "--stages", "1"))
    assert rows[1]["n_selected"] == 8


def test_non_causal_model_is_refused(tmp_path, prompts_file):
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(
        T5Config(vocab_size=384, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    ).save_pretrained(tmp_path / "t5")
    ByT5Tokenizer().save_pretrained(tmp_path / "t5")
    fails(tiny_args(str(tmp_path / "t5"), prompts_file, tmp_path / "r"), "--model", "causal LM")


def test_prompts_not_divisible_by_ranks(tiny_lm, prompts_file, tmp_path, monkeypatch):
    monkeypatch.setattr(checks, "WORLD", 3)
    fails(tiny_args(tiny_lm, prompts_file, tmp_path / "r"), "--prompts_per_stage 8", "multiple of 3")


def test_micro_batch_size_is_a_per_process_cap_not_a_divisor(tiny_lm, prompts_file, tmp_path, monkeypatch):
    """Any number of processes that divides --train_batch_size works, whatever --micro_batch_size is."""
    monkeypatch.setattr(checks, "WORLD", 8)
    args = tiny_args(tiny_lm, prompts_file, tmp_path / "r", "--train_batch_size", "16", "--micro_batch_size", "8")
    assert raft.parse(args + ["--prompts_per_stage", "64"]).micro_batch_size == 8  # 8 × 8 = 64 > 16: fine now
    monkeypatch.setattr(checks, "WORLD", 3)
    fails(args + ["--prompts_per_stage", "9"], "--train_batch_size 16", "multiple of 3")


def test_the_demo_never_overrides_an_option_given_on_the_command_line():
    import demo

    def parse(argv, kind="reviews"):
        return raft.parse(demo.raft_args(kind, "d", argv))

    assert parse([]).micro_batch_size == 16  # the demo's value where nothing was given
    assert parse(["--micro_batch_size", "8"]).micro_batch_size == 8  # the paper's default, typed: kept
    assert parse(["--micro_batch_size=8", "--K", "8"]).micro_batch_size == 8
    assert parse(["--lr", "2e-5"]).lr == 2e-5 and parse([]).lr == 1e-4
    assert parse([]).reward == ["reward:vader_sentiment"] and parse(["--reward", "r.py:f"]).reward == ["r.py:f"]
    arith = parse([], "arithmetic")
    assert (arith.ranking, arith.pass_k, arith.eval_split, arith.dataset) == ("positive", "1,8", "test", "d/data")
    with pytest.raises(SystemExit, match="run raft.py for --model"):
        parse(["--model", "m"])


def test_raft_py_without_a_model_says_how_to_run_the_demo(prompts_file):
    """--model, --dataset and --reward are required; each missing one is a one-line error naming it."""
    with pytest.raises(SystemExit, match="--model is required.*python demo.py"):
        raft.parse(["--dataset", prompts_file, "--reward", "r.py:f"])
    with pytest.raises(SystemExit, match="--dataset is required"):
        raft.parse(["--model", "m", "--reward", "r.py:f"])
    with pytest.raises(SystemExit, match="--reward is required"):
        raft.parse(["--model", "m", "--dataset", prompts_file])


def test_every_entry_point_prints_its_help(capsys, monkeypatch):
    """Each script run as __main__ with --help prints its usage and exits 0. One process for all of them: a fresh
    interpreter per script would spend most of its time importing torch and transformers again."""
    import runpy
    import sys

    for script in ["raft.py", "demo.py", "sft.py", "rm.py", "eval.py", "diffusion.py", "bench.py", "bench_peer.py",
                   "plan.py"]:  # fmt: skip
        monkeypatch.setattr(sys, "argv", [script, "--help"])
        with pytest.raises(SystemExit) as done:
            runpy.run_path(os.path.join(os.path.dirname(HERE), script), run_name="__main__")
        assert done.value.code == 0 and "usage:" in capsys.readouterr().out, script


def test_eval_prompts_zero_with_the_kl_term(tiny_lm, prompts_file, tmp_path):
    rows = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "r", "--eval_prompts", "0", "--stages", "1",
                               "--kl_beta", "0.1"))  # fmt: skip
    assert [r["stage"] for r in rows] == [0, 1] and "kl_to_start" in rows[1]
    assert not any(k.startswith("eval_") for r in rows for k in r)


def test_malformed_files_name_the_file_and_line(tiny_lm, prompts_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n\n" + '{"prompt": "unclosed\n')
    fails(tiny_args(tiny_lm, str(bad), tmp_path / "a"), str(bad), "line 3", "not valid JSON")
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n\n" + json.dumps({"prompt": " "}) + "\n")
    fails(tiny_args(tiny_lm, str(bad), tmp_path / "b"), str(bad), "line 3", "'prompt'")
    raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "r", "--stages", "1"))
    (tmp_path / "r" / "config.json").write_text("{not json")
    fails(tiny_args(tiny_lm, prompts_file, tmp_path / "r", "--stages", "2", "--resume"), "config.json", "line 1")
    import eval as ev

    (tmp_path / "responses.jsonl").write_text('{"response": "fine"}\n[1, 2\n')
    with pytest.raises(SystemExit, match=r"responses.jsonl line 2: not valid JSON"):
        ev.main(["--responses", str(tmp_path / "responses.jsonl")])


def test_unwritable_out_dir(tiny_lm, prompts_file, tmp_path):
    (tmp_path / "file").write_text("")
    fails(tiny_args(tiny_lm, prompts_file, tmp_path / "file" / "run"), "--out_dir", "not writable")


# ---- runs that cannot mean anything, refused by checks.py before any model loads (docs/outputs.md, "Bad input") ----
BASE = ["--model", "m", "--dataset", "d.jsonl", "--reward", "r.py:f", "--prompts_per_stage", "8"]
REFUSED = [  # raft.py's options (sft.py and demo.py take the same checks): extra arguments, what the message names
    (["--temperature", "inf"], "--temperature inf"), (["--temperature", "nan"], "--temperature nan"),
    (["--top_p", "nan"], "--top_p nan"), (["--lr", "inf"], "--lr inf"), (["--weight_decay", "-0.1"], "--weight_decay"),
    (["--weight_decay", "nan"], "--weight_decay nan"), (["--max_grad_norm", "0"], "--max_grad_norm 0"),
    (["--max_grad_norm", "nan"], "--max_grad_norm nan"), (["--keep_threshold", "nan"], "--keep_threshold nan"),
    (["--kl_beta", "inf"], "--kl_beta inf"), (["--clip_eps", "1"], "--clip_eps 1"), (["--clip_eps", "nan"], "nan"),
    (["--loss", "clip", "--clip_eps_high", "0"], "--clip_eps_high 0"), (["--clip_eps_high", "0.28"], "--loss clip"),
    (["--lora_r", "-1"], "--lora_r"), (["--lora_r", "8", "--lora_alpha", "0"], "--lora_alpha 0"),
    (["--lora_dropout", "1"], "--lora_dropout 1"), (["--lora_r", "8", "--lora_target_modules", "q_proj,"], "modules"),
    (["--vllm_memory", "0"], "--vllm_memory"), (["--vllm_memory", "1.5"], "(0, 1]"), (["--vllm_memory", "nan"], "nan"),
    (["--train_batch_size", "0"], "--train_batch_size"), (["--reward_batch_size", "0"], "--reward_batch_size"),
    (["--max_prompt_tokens", "0"], "--max_prompt_tokens"), (["--stop", ""], "--stop ''"),
    (["--device", "gpu"], "--device 'gpu'"), (["--discard_regex", "x*"], "matches the empty string"),
    (["--reward_weights", "nan"], "finite"), (["--reward", "r.py:g", "--reward_weights", "0,0"], "every weight is 0"),
    (["--reward", "some/rm", "--reward_template", "{prompt}"], "no {response}"),
    (["--K", "1", "--advantage", "grpo"], "--K 1"), (["--K", "1", "--drop_all_correct"], "--K 1"),
    (["--K", "1", "--drop_all_correct", "--drop_all_wrong", "--advantage", "reinforce"], "--K 1"),
    (["--ranking", "all", "--advantage", "grpo", "--kl_beta", "0.1"], "--eval_kl"),
    (["--regime", "rl", "--mini_batches", "3"], "--mini_batches 3 must divide"),
    (["--regime", "rl", "--mini_batches", "16"], "--mini_batches 16 must divide"),
    (["--eval_prompts", "0", "--eval_samples", "4", "--pass_k", "1,4"], "--eval_prompts 0"),
]  # fmt: skip
ALLOWED = [  # unusual, and meaningful: kept
    ["--max_grad_norm", "inf"], ["--temperature", "0"], ["--ranking", "local", "--advantage", "correct"],
    ["--ranking", "all"], ["--K", "1", "--drop_all_wrong"], ["--K", "1", "--drop_all_correct", "--advantage",
    "reinforce"], ["--loss", "clip", "--epochs", "3"], ["--regime", "rl", "--mini_batches", "8"],
    ["--reward", "r.py:g", "--reward_weights", "1,-0.5"], ["--discard_regex", "#"],
    ["--loss", "clip", "--finetune_from", "base"],  # π_θ / π_sampler, the θ restarted from stage 0: off-policy PPO
]  # fmt: skip


@pytest.mark.parametrize("extra,needle", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_a_run_that_cannot_mean_anything_is_refused(extra, needle):
    with pytest.raises(SystemExit) as e:
        raft.parse(BASE + extra)
    assert "\n" not in str(e.value) and needle in str(e.value), str(e.value)


def test_unusual_but_meaningful_runs_are_not_refused():
    for extra in ALLOWED:
        raft.parse(BASE + extra)


def test_devices_are_checked_before_anything_loads(monkeypatch):
    """--device cuda without a GPU, and under torchrun more processes on a node than GPUs, were errors of the first
    CUDA call (after the dataset and the tokenizer); a name other than auto, cpu or cuda ran on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda: torch sees no GPU"):
        raft.parse(BASE + ["--device", "cuda"])
    raft.parse(BASE + ["--device", "auto"])  # no GPU: the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(checks, "LOCAL_RANK", 3)  # the fourth process of a node with two GPUs
    for device in ("auto", "cuda"):
        with pytest.raises(SystemExit, match="cuda:3, and torch sees 2"):
            raft.parse(BASE + ["--device", device])
    raft.parse(BASE + ["--device", "cpu"])


def test_sft_eval_diffusion_and_bench_refuse_meaningless_options(tmp_path):
    import bench
    import diffusion
    import eval as ev
    import sft

    for extra, needle in [(["--regime", "rl"], "--loss sft"), (["--loss", "clip"], "--loss sft"),
                          (["--lr", "nan"], "--lr nan")]:  # fmt: skip
        with pytest.raises(SystemExit, match=needle):
            sft.main(["--model", "m", "--dataset", "d.jsonl", "--out_dir", str(tmp_path / "s"), *extra])
    table = ["--model", "m", "--dataset", "d.jsonl", "--reward", "r.py:f"]
    for extra, needle in [(["--temperature", "nan"], "--temperature nan"), (["--top_p", "0"], "--top_p"),
                          (["--lora_r", "8"], "--lora_r"), (["--pass_k", "1"], "--responses"),
                          (["--gen_backend", "vlm"], "--gen_backend"), (["--eval_prompts", "0"], "--eval_prompts"),
                          (["--stop", ""], "--stop"), (["--reward_weights", "inf"], "finite"),
                          (["--device", "gpu"], "--device")]:  # fmt: skip
        with pytest.raises(SystemExit, match=needle):
            ev.main(table + extra)
    for extra, needle in [(["--lr", "inf"], "--lr inf"), (["--guidance", "nan"], "--guidance nan"),
                          (["--weight_decay", "-1"], "--weight_decay"), (["--max_grad_norm", "0"], "--max_grad_norm"),
                          (["--lora_alpha", "0"], "--lora_alpha 0"), (["--ranking", "all"], "--ranking 'all'"),
                          (["--reward_weights", "nan"], "finite"), (["--device", "gpu"], "--device")]:  # fmt: skip
        with pytest.raises(SystemExit, match=needle):
            diffusion.parse(["--out_dir", str(tmp_path / "d"), *extra])
    for extra in (["--K", "-1"], ["--gen_batch_size", "0"]):
        with pytest.raises(SystemExit):
            bench.parse(extra)
