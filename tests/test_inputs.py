"""Bad input gets a one-line error that names the input and the fix (SystemExit, before models load where possible),
or a counted skip; and the reward loaders (callables, a sequence-classification model)."""
import json
import os

import pytest
import torch

import raft
from conftest import tiny_args
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
    fails(tiny_args(tiny_lm, prompts_file, tmp_path / "a", "--train_batch_size", "6"), "--train_batch_size", "4")
    fails(tiny_args(tiny_lm, prompts_file, tmp_path / "a", "--discard_regex", "(["), "--discard_regex")
    fails(tiny_args(tiny_lm, prompts_file, tmp_path / "a", "--eval_prompts", "100"), "--eval_prompts")
    fails(tiny_args(str(tmp_path / "nope"), prompts_file, tmp_path / "b"), "--model", "nope")


def test_dataset_errors(tiny_lm, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    fails(tiny_args(tiny_lm, str(bad), tmp_path / "a"), "row 1", "'prompt'", "--prompt_field")
    bad.write_text(json.dumps({"prompt": 3}) + "\n")
    fails(tiny_args(tiny_lm, str(bad), tmp_path / "b"), "row 0")


def test_out_dir_is_never_overwritten_and_resume_checks_config(tiny_lm, prompts_file, tmp_path):
    raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "r", "--iterations", "1"))
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    fails(tiny_args(tiny_lm, prompts_file, tmp_path / "r", "--iterations", "1"), "not empty", "--resume")
    fails(tiny_args(tiny_lm, prompts_file, tmp_path / "r", "--iterations", "2", "--K", "2", "--resume"), "'K'")
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("fn,needle", [("wrong_length", "returned 9 values for 8"), ("raises", "reward server down")])
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
    rows = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "a", "--iterations", "1", "--reward",
                               f"{HERE}/rewards.py:nan_for_odd"))
    assert rows[1]["samples_nan_reward"] == 16 and rows[1]["n_selected"] == 8
    v = score(lambda p, r: [1, float("inf"), "2"], ["a"] * 3, ["b"] * 3)
    assert v[0] == 1.0 and v[1] != v[1] and v[2] == 2.0    # inf comes back as NaN


def test_reward_model_batched_equals_one_at_a_time(tmp_path):
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForSequenceClassification
    tok = ByT5Tokenizer()
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id, max_position_embeddings=64))
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    prompts = ["###Human: hi ###Assistant:", "###Human: a much longer question here ###Assistant:", "x"]
    responses = [" hello", " short", " a response that is rather long" * 3]
    fn = load_reward(str(tmp_path / "rm"), template="{prompt}{response}", batch_size=2)
    batched = fn(prompts, responses)
    alone = [fn([p], [r])[0] for p, r in zip(prompts, responses)]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(round(v, 6) for v in batched)) == 3    # real, distinct scores in the input order


def test_readme_documents_every_option_and_metric(tiny_lm, prompts_file, tmp_path):
    import dataclasses
    readme = open(os.path.join(os.path.dirname(HERE), "README.md")).read()
    missing = [f.name for f in dataclasses.fields(raft.Config) if f"`--{f.name}`" not in readme]
    assert not missing, f"options not in the README: {missing}"
    for f in dataclasses.fields(raft.Config):
        assert f.metadata.get("help"), f"--{f.name} has no help text"
    rows = raft.main(tiny_args(tiny_lm, prompts_file, tmp_path / "r", "--iterations", "1", "--kl_beta", "0.1"))
    keys = set(rows[0]) | set(rows[1])
    assert not [k for k in keys if f"`{k}`" not in readme], "metrics not in the README"
