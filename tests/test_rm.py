"""rm.py, the reward-model trainer: the Bradley–Terry loss and accuracy by hand, the preference formats (Dahoas,
Anthropic dialogues, chat rows), a toy preference learned, saved directories that reward.py (and so raft.py and
eval.py) scores exactly as rm.py's evaluation did (full, LoRA with a chat template, 8-bit + LoRA), two processes
under torchrun against one, and bad input as one-line errors or counted skips."""

import json
import math
import os
import random

import pytest
import torch
from conftest import make_tiny_lm
from test_torchrun import torchrun

import raft
import rm
from data import load_rows
from reward import chat_messages, load_reward, load_rewards, reward_ids

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "hh_rlhf.jsonl")
CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = "the movie cat sat on a mat why is sky blue tell me story good bad".split()


def toy_rows(n, seed=0):
    """Preference rows with a clear rule: the chosen text contains the marker '#', the rejected one does not."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = ([rng.choice(WORDS) for _ in range(rng.randint(3, 8))] for _ in range(2))
        a.insert(rng.randint(0, len(a)), "#")
        rows.append(
            {"prompt": f"Q{i}: " + " ".join(rng.sample(WORDS, 3)), "chosen": " ".join(a), "rejected": " ".join(b)}
        )
    return rows


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rm_args(model, data, out, *extra):
    return ["--model", model, "--dataset", data, "--out_dir", str(out), "--prompt_format", "raw", "--lr", "3e-3",
            "--epochs", "3", "--train_batch_size", "16", "--micro_batch_size", "8", "--eval_every", "10",
            "--device", "cpu", *extra]  # fmt: skip


def reloaded_scores(out):
    """The held-out pairs rm.py scored, scored again by reward.py from the saved directory."""
    rows = [json.loads(line) for line in open(os.path.join(out, "eval_scores.jsonl"))]
    fn = load_reward(str(out))
    prompts = [r["prompt"] for r in rows]
    got = fn(prompts, [r["chosen"] for r in rows]) + fn(prompts, [r["rejected"] for r in rows])
    return torch.tensor(got), torch.tensor([r["score_chosen"] for r in rows] + [r["score_rejected"] for r in rows])


def test_bradley_terry_loss_and_accuracy_by_hand():
    c, r = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0])
    # −log σ(d) = log(1 + e^−d) for d = 2, −1, 0
    want = torch.tensor([math.log(1 + math.exp(-2)), math.log(1 + math.e), math.log(2)])
    assert torch.allclose(rm.bt_loss(c, r), want)
    assert torch.allclose(rm.bt_loss(c, r, torch.tensor([1.0, 0.0, 0.0]))[0], torch.tensor(math.log(1 + math.exp(-1))))
    assert rm.pair_accuracy(c, r) == pytest.approx(0.5)  # right, wrong, a tie (one half)


def test_every_preference_format_gives_the_same_pairs():
    cfg = rm.RMConfig()
    dahoas = load_rows(FIXTURE)
    pairs, fmt, skipped = rm.preference_pairs(dahoas, cfg, "d")
    assert fmt == "hh" and len(pairs) == 11 and skipped == {"an empty, null or missing text": 1}  # the empty talk
    assert pairs[0]["prompt"] == "###Human: What are some good vegetables to grow in a small garden?###Assistant:"
    assert pairs[3]["chosen"] == "How about Milo or Luna?"  # stripped
    # Anthropic/hh-rlhf: two whole dialogues, split after the last assistant cue they share
    anthropic = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in dahoas]
    split = rm.preference_pairs(anthropic, cfg, "a")[0]
    key = lambda ps: [(p["prompt"], p["chosen"], p["rejected"]) for p in ps]
    assert key(split) == key(pairs)
    # chat rows: message lists, with the prompt implicit (all but the last message) or explicit
    to_msgs = lambda text: [{"role": "user" if r == "Human" else "assistant", "content": t}
                            for r, t in __import__("data").hh_turns(text)]  # fmt: skip
    implicit = [{"chosen": to_msgs(r["prompt"]) + [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": to_msgs(r["prompt"]) + [{"role": "assistant", "content": r["rejected"]}]}
                for r in dahoas]  # fmt: skip
    explicit = [
        {"prompt": m["chosen"][:-1], "chosen": m["chosen"][-1:], "rejected": m["rejected"][-1:]} for m in implicit
    ]
    assert key(rm.preference_pairs(implicit, cfg, "c")[0]) == key(pairs)
    assert key(rm.preference_pairs(explicit, cfg, "e")[0]) == key(pairs)
    # the chat view of a pair is its turns, whether the prompt is `###Human` text or raw
    assert chat_messages(pairs[1]["prompt"], "x")[:2] == [
        {"role": "user", "content": "How do I boil an egg?"},
        {"role": "assistant", "content": "Put it in boiling water."},
    ]
    assert chat_messages("a raw prompt", "y") == [{"role": "user", "content": "a raw prompt"},
                                                  {"role": "assistant", "content": "y"}]  # fmt: skip


def test_bad_rows_are_counted_skips_and_bad_input_one_line(tiny_lm, tmp_path, capsys):
    cfg = rm.RMConfig(prompt_format="raw")
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": None, "rejected": "b"},
            {"prompt": "p", "chosen": " ", "rejected": "b"}, {"prompt": "p", "chosen": "same", "rejected": "same "},
            {"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: y\n\nAssistant: b", "prompt": None},
            {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "not an object"]  # fmt: skip
    pairs, _, skipped = rm.preference_pairs(rows, cfg, "d")
    assert len(pairs) == 1 and skipped == {"an empty, null or missing text": 4, "chosen identical to rejected": 1,
                                           "a 'margin' that is not a number": 1}  # fmt: skip
    anthropic = [{"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: y\n\nAssistant: b"}]
    assert rm.preference_pairs(anthropic, rm.RMConfig(), "a")[2] == {"no shared prompt": 1}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    long = [{"prompt": "p", "chosen": "x" * 50, "rejected": "b", "margin": 0.0}, {**pairs[0]}]
    assert len(rm.encode_pairs(tok, long, cfg, 40, "d", log=print)) == 1
    assert "dropped 1 of 2 pairs whose chosen or rejected text is longer than 40 tokens" in capsys.readouterr().out

    def fails(argv, *needles):
        with pytest.raises(SystemExit) as e:
            rm.main(argv)
        assert "\n" not in str(e.value) and all(n in str(e.value) for n in needles), str(e.value)

    good = write(tmp_path / "good.jsonl", toy_rows(8))
    fails(rm_args(tiny_lm, write(tmp_path / "m.jsonl", [{"prompt": "p", "answer": "a"}]), tmp_path / "o"),
          "'chosen' and 'rejected'", "['answer', 'prompt']")  # fmt: skip
    fails(rm_args(tiny_lm, write(tmp_path / "n.jsonl", rows[1:5]), tmp_path / "o"), "no usable preference pair")
    fails(rm_args(tiny_lm, good, tmp_path / "o", "--max_length", "8"), "no usable preference pair")  # all too long
    (tmp_path / "file").write_text("x")
    fails(rm_args(tiny_lm, good, tmp_path / "file"), "--out_dir", "is a file")
    fails(rm_args(tiny_lm, good, tmp_path / "o", "--eval_pairs", "8"), "--eval_pairs")
    fails(rm_args(tiny_lm, good, tmp_path / "o", "--chat_template"), "--chat_template", "no chat template")
    fails(rm_args(tiny_lm, good, tmp_path / "o", "--reward_template", "{prompt}"), "{response}")
    assert not (tmp_path / "o").exists()  # every error came before the run directory was made


@pytest.fixture(scope="module")
def toy_rm(tiny_lm, tmp_path_factory):
    d = tmp_path_factory.mktemp("toy_rm")
    rows = rm.main(rm_args(tiny_lm, write(d / "toy.jsonl", toy_rows(300)), d / "rm", "--eval_pairs", "100"))
    return d / "rm", rows


@pytest.mark.xdist_group("toy_rm")
def test_a_toy_preference_is_learned_and_reloads_exactly(toy_rm):
    out, rows = toy_rm
    assert rows[0]["step"] == 0 and rows[-1]["eval_accuracy"] >= 0.9 and rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert [json.loads(line) for line in open(out / "metrics.jsonl")] == rows
    info = json.load(open(out / "rm.json"))
    assert info["eval_accuracy"] == rows[-1]["eval_accuracy"] and info["base"] is None and info["n_eval"] == 100
    got, want = reloaded_scores(out)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.xdist_group("toy_rm")
def test_raft_optimises_a_trained_reward_and_logs_each_reward(toy_rm, tiny_lm, prompts_file, tmp_path):
    """raft.py --reward DIR and eval.py --reward DIR score with the directory's template; a second reward with
    weight 0 (the demo's gold) is logged per stage beside the one ranked by, and changes nothing."""
    from conftest import tiny_args

    out, _ = toy_rm
    args = tiny_args(tiny_lm, prompts_file, tmp_path / "r", "--stages", "1")
    args[args.index("--reward") + 1] = str(out)
    rows = raft.main(args + ["--reward", "reward:vader_sentiment", "--reward_weights", "1,0"])
    last = json.loads(open(tmp_path / "r" / "stage_0001" / "metrics.json").read())
    samples = [json.loads(line) for line in open(tmp_path / "r" / "stage_0001" / "eval_samples.jsonl")]
    fn = load_reward(str(out))
    proxy = fn([s["prompt"] for s in samples], [s["response"] for s in samples])
    assert [s["reward"] for s in samples] == pytest.approx(proxy, abs=1e-5)
    assert last["eval_reward_0_mean"] == pytest.approx(last["eval_reward_mean"], abs=1e-6)
    assert "eval_reward_1_mean" in rows[0] and "eval_reward_1_mean" in last
    with pytest.raises(SystemExit, match="differs from"):  # the directory's template wins; another one is refused
        load_rewards([str(out)], template="{response}")
    import eval as ev  # eval.py's table scores with it the same way

    ev.main(
        f"--model {tiny_lm} --dataset {prompts_file} --dataset_split train --eval_prompts 4 --reward {out} "
        f"--max_new_tokens 8 --device cpu --out_dir {tmp_path / 'e'}".split()
    )
    rows = [json.loads(line) for line in open(tmp_path / "e" / "samples.jsonl")]
    assert [r["reward"] for r in rows] == pytest.approx(fn([r["prompt"] for r in rows], [r["response"] for r in rows]))


def test_lora_with_a_chat_template_and_8bit_lora_reload_exactly(tmp_path):
    """A LoRA reward model on chat rows through a chat template, and one on an 8-bit base from Anthropic-style
    dialogues: reward.py loads each directory as it is (adapters on their base, 8-bit again) and gives the scores
    rm.py's evaluation gave."""
    lm = make_tiny_lm(tmp_path / "lm")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm)
    tok.chat_template = CHAT
    tok.save_pretrained(lm)
    rows = toy_rows(48)
    chat = [{"chosen": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}]}
            for r in rows]  # fmt: skip
    dialogues = [{"chosen": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['chosen']}",
                  "rejected": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['rejected']}"} for r in rows]  # fmt: skip
    for name, data, extra in [("lora_chat", chat, ["--lora_r", "4", "--chat_template"]),
                              ("int8", dialogues, ["--lora_r", "4", "--load_in_8bit"])]:  # fmt: skip
        out = tmp_path / name
        rm.main(
            rm_args(lm, write(tmp_path / f"{name}.jsonl", data), out, "--eval_pairs", "16", "--epochs", "1", *extra)
        )
        info = json.load(open(out / "rm.json"))
        assert info["base"] == os.path.abspath(lm) and not os.path.exists(out / "model.safetensors")
        got, want = reloaded_scores(out)
        assert torch.allclose(got, want, atol=1e-5), name
        fn = load_reward(str(out))
        if name == "int8":
            assert any(type(m).__name__ == "Linear8bitLt" for m in fn.model.modules())
        else:  # the chat view: a `###Human` prompt and the same question raw are one conversation
            first = json.loads(open(out / "eval_scores.jsonl").readline())
            q, a = first["prompt"].removeprefix("###Human: ").removesuffix("###Assistant:"), first["chosen"]
            assert fn([first["prompt"], q], [a, a]) == pytest.approx([first["score_chosen"]] * 2, abs=1e-5)
            assert reward_ids(tok, [q], [a], chat=True)[0] == tok(f"<|user|>{q}\n<|assistant|>{a}\n")["input_ids"][:-1]


def test_two_processes_give_one_processs_losses(tiny_lm, tmp_path):
    """torchrun with 2 processes (full fine-tuning: FSDP2) ends where one process ends: the same train and
    held-out losses at every evaluation, and the same saved scores. Up to 2e-4: AdamW divides by |g|, which turns
    the rounding of a different summation order in near-zero gradient entries into weight changes of up to lr (the
    two runs differ by 1e-7 at the first evaluation after a step, by 6e-5 at the end; a pair lost or counted twice
    moves them by 1e-2)."""
    data = write(tmp_path / "toy.jsonl", toy_rows(60))
    extra = ["--eval_pairs", "12", "--epochs", "1", "--train_batch_size", "8", "--micro_batch_size", "3",
             "--eval_every", "3"]  # fmt: skip
    one = rm.main(rm_args(tiny_lm, data, tmp_path / "one", *extra))
    torchrun(rm_args(tiny_lm, data, tmp_path / "two", *extra), script=os.path.join(os.path.dirname(HERE), "rm.py"))
    two = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    keys = ["train_loss", "train_accuracy", "eval_loss", "eval_accuracy", "eval_margin"]
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 3, 6]
    for a, b in zip(one, two):
        assert all(a.get(k) == pytest.approx(b.get(k), abs=2e-4) for k in keys), (a, b)
    scores = [
        [json.loads(line)["score_chosen"] for line in open(tmp_path / d / "eval_scores.jsonl")] for d in ("one", "two")
    ]
    assert scores[0] == pytest.approx(scores[1], abs=2e-4)


def test_the_rm_demos_table_plot_and_refusals(tmp_path):
    """demo.py --demo rm: best-of-n's KL by hand, the table and the plot over seeds (synthetic runs in the
    SETTING__s<seed> layout: a gold reward that peaks at stage 1), and the options it sets itself refused."""
    import demo

    assert demo.best_of_n_kl(1) == 0 and demo.best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    for seed, bump in ((1, 0.0), (2, 0.2)):
        rows = [{"stage": t, "eval_reward_0_mean": t + bump, "eval_reward_1_mean": [0.1, 0.5, 0.3][t] + bump,
                 "eval_kl_to_start": 2.0 * t} for t in range(3)]  # fmt: skip
        (tmp_path / f"K16__s{seed}").mkdir()
        write(tmp_path / f"K16__s{seed}" / "metrics.jsonl", rows)
    (tmp_path / "rm800_s1").mkdir()  # a reward model's directory is not a setting
    table = demo.rm_table(str(tmp_path)).splitlines()
    assert len(table) == 3 and table[2].startswith("| K16 | 2 |")
    # gold at stage 0 0.1/0.3, its peak 0.5/0.7 at stage 1 (KL 2), at the end 0.3/0.5, proxy 2/2.2, KL 4
    assert "| +0.200 ± 0.141 | +0.600 ± 0.141 | 1.0 ± 0.0 | 2.00 ± 0.00 | +0.400 ± 0.141 | +2.100 ± 0.141 |" in table[2]
    demo.rm_plot(str(tmp_path), str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="sweeps --K"):
        demo.main(["--demo", "rm", "--K", "8"])
