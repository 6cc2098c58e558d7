"""bench.py --shape tiny runs on the CPU in seconds (under torchrun too) and reports every phase: the
kit's generation does the same work as the baselines, its greedy tokens equal model.generate's, a stage runs. The
stage tests are smoke tests (they run and report); benchmarks are not timed tests: bench.py measures and prints."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(tmp_path, *args, launcher=()):
    """bench.py's rows and printed table: in this process, or as a user launches it (a launcher: torchrun)."""
    out = tmp_path / "rows.jsonl"
    argv = ["--shape", "tiny", "--json", str(out), *args]
    if not launcher:  # in process: a subprocess would spend most of its time importing torch and transformers again
        import contextlib
        import io

        import bench

        with contextlib.redirect_stdout(io.StringIO()) as printed:
            bench.main(argv)
        return printed.getvalue(), [json.loads(line) for line in open(out)]
    p = subprocess.run([sys.executable, *launcher, "bench.py", *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, [json.loads(line) for line in open(out)]


def test_bench_tiny_all_phases(tmp_path):
    stdout, rows = run_bench(tmp_path, "--phase", "all")
    gen = {r["variant"]: r for r in rows if r["phase"] == "generate"}
    assert set(gen) == {"hf-1 (4 prompts)", "hf-64", "kit fastgen"}
    assert gen["kit fastgen"]["tokens"] == gen["hf-64"]["tokens"] == 16 * 8 * 16  # b·K·new: the same work
    assert gen["hf-1 (4 prompts)"]["tokens"] == 4 * 8 * 16
    assert gen["kit fastgen"]["greedy_same_as_generate"] == 1.0
    assert {r["phase"] for r in rows} == {"generate", "score", "train"}
    for r in rows:
        assert r["secs"] > 0 and r["tok_s"] > 0 and 0 < r["frac_roofline"] < 1, r
    assert "| generate | tiny | kit fastgen" in stdout and "× hf-1" in stdout and "× hf-64" in stdout


def test_smoke_bench_tiny_stage(tmp_path):
    _, rows = run_bench(tmp_path, "--phase", "stage", "--prompts", "16")
    (row,) = rows
    assert row["variant"] == "b=16 K=8" and all(row[k] >= 0 for k in ("time_sample", "time_train", "time_eval"))
    assert not any(k.startswith("peak_gib") for k in row)  # GPU memory only on a GPU


def test_smoke_bench_tiny_stage_with_a_reward_model_and_raft_options_under_torchrun(tmp_path):
    """The commands BENCHMARKS.md lists for the memory modes and the world-size-1 engines, tiny: a
    reward model of --reward_shape, --raft_args passed to raft.py, and a run under torchrun."""
    _, rows = run_bench(
        tmp_path,
        "--phase",
        "stage",
        "--prompts",
        "8",
        "--reward_shape",
        "tiny",
        "--raft_args",
        "--lora_r 4 --gradient_checkpointing",
        launcher=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"],
    )
    (row,) = rows
    assert row["variant"] == "b=8 K=8 reward tiny --lora_r 4 --gradient_checkpointing (torchrun)"
    assert row["time_sample"] > 0 and row["time_train"] > 0


def test_smoke_bench_tiny_diffusion_stage(tmp_path):
    _, rows = run_bench(tmp_path, "--phase", "diffusion")
    (row,) = rows
    assert row["variant"] == "diffusion b=4 K=8" and row["time_sample"] > 0 and row["time_train"] > 0


def test_memory_counts_are_those_of_the_real_models(tmp_path):
    """bench.py --phase memory computes from meta-device counts; on the tiny shape they equal the real models': all
    parameters, peft's trainable LoRA parameters (r=16, all-linear), and the bytes of a bitsandbytes 8-bit model
    after peft's k-bit preparation (int8 projections, fp32 row scales, the rest fp32)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    import bench

    counts = bench.param_counts("tiny")
    LlamaForCausalLM(LlamaConfig(**bench.SHAPES["tiny"], pad_token_id=0)).save_pretrained(tmp_path / "m")
    q = LlamaForCausalLM.from_pretrained(
        tmp_path / "m",
        quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        device_map={"": "cpu"},
        dtype=torch.float32,
    )
    q = prepare_model_for_kbit_training(q, use_gradient_checkpointing=False)
    assert counts["total"] == sum(p.numel() for p in q.parameters())
    scales = sum(
        m.weight.SCB.numel() * 4 for m in q.modules() if getattr(getattr(m, "weight", None), "SCB", None) is not None
    )
    assert (
        counts["linear"] + 4 * counts["int8_scales"] + 4 * counts["rest"]
        == sum(p.numel() * p.element_size() for p in q.parameters()) + scales
    )
    lora = get_peft_model(q, LoraConfig(r=16, target_modules="all-linear"))
    assert counts["lora"] == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    stdout, rows = run_bench(tmp_path, "--phase", "memory", "--gen_batch_size", "8")
    assert [r["variant"] for r in rows][0] == "8-bit base + LoRA" and "computed, not measured" in stdout


def test_flop_counts_leave_out_the_input_embedding_and_count_a_tied_head_once():
    """The roofline's N: the parameters that do matmuls. The input embedding (a lookup) is not among them; the LM
    head is, also when it shares the embedding's weight."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import bench

    for tied in (False, True):
        cfg = LlamaConfig(**bench.SHAPES["tiny"], pad_token_id=0, tie_word_embeddings=tied)
        model = LlamaForCausalLM(cfg)
        h, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
        kv = cfg.num_key_value_heads * h // cfg.num_attention_heads
        layer = 2 * h * h + 2 * h * kv + 3 * h * cfg.intermediate_size  # q, o; k, v; gate, up, down
        assert bench.matmul_params(model) == (L * layer + V * h, V * h), tied
        assert bench.n_params(model) == L * layer + (1 if tied else 2) * V * h + (2 * L + 1) * h  # + norms


def cache_bytes(model, rows: int, tokens: int) -> int:
    """Bytes of the keys and values a real forward pass caches for rows × tokens."""
    import torch

    with torch.no_grad():
        cache = model(input_ids=torch.randint(3, 500, (rows, tokens)), use_cache=True).past_key_values
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def test_kv_cache_figure_is_the_bytes_a_real_cache_holds():
    """The memory table's KV cache, B prompts × K samples: fastgen keeps each prompt's keys and values once and each
    sample's new tokens' once per sample, in bf16. A real bf16 cache of B rows × prompt tokens plus one of B·K rows ×
    new tokens holds exactly the bytes bench.kv_bytes computes (grouped-query heads, layers and dtype included)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import bench

    model = LlamaForCausalLM(LlamaConfig(**bench.SHAPES["tiny"], pad_token_id=0)).to(torch.bfloat16).eval()
    B, K, Lp, S = 3, 4, 7, 5
    real = cache_bytes(model, B, Lp) + cache_bytes(model, B * K, S)
    assert bench.kv_bytes(bench.param_counts("tiny"), B, K, Lp, S) == real


def test_greedy_check_compares_like_with_like():
    """A model that picks EOS greedily after a few tokens: fastgen (which never masks EOS) and model.generate agree
    on every token, so the check reports no disagreement that is not there."""
    import torch

    import bench
    from fastgen import sample

    model = bench.build("tiny")
    with torch.no_grad():
        model.lm_head.weight[2] = model.lm_head.weight[3:].mean(0) + model.lm_head.weight[3:].std(0) * 8
    prompts = torch.randint(3, 512, (4, 16), generator=torch.Generator().manual_seed(0)).tolist()
    greedy = sample(model, prompts, 1, max_new_tokens=16, eos_ids={2}, pad_id=0, temperature=0, cuda_graphs=False)
    assert sorted(len(r[0]) for r in greedy) == [1, 2, 3, 4]  # EOS is picked, after 0 to 3 other tokens
    assert bench.greedy_agreement(model, prompts, 16, cuda_graphs=False) == 1.0


def test_bench_gpu_script_tiny_mode_writes_a_section_and_reports_what_it_skipped(tmp_path):
    """bench_gpu.sh at the tiny shape on the CPU (BENCH_SHAPE=tiny), one step selected: it appends one dated section
    to BENCH_OUT (whatever the file held stays), with the device, versions and command, the step's command and
    table, and a list of what it did not run and why: vLLM (no GPU here) and each step not selected."""
    import re

    out = tmp_path / "BENCH.md"
    out.write_text("# earlier\n")
    p = subprocess.run(
        ["bash", "bench_gpu.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BENCH_SHAPE": "tiny", "BENCH_OUT": str(out), "BENCH_STEPS": "memory"},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# earlier\n") and text.count("\n## ") == 1
    section = text.split("\n## ", 1)[1]
    assert re.match(r"CPU \(\d+ cores, no GPU\), \d{4}-\d\d-\d\d \(bench_gpu\.sh\)\n", section), section[:200]
    assert "`BENCH_SHAPE=tiny " in section and "bench_gpu.sh" in section
    for lib in ("torch", "transformers", "peft", "bitsandbytes", "vllm", "diffusers", "trl"):
        assert re.search(rf"\b{lib} (\S+\d|not importable)", section), lib
    head, notrun = section.split("### Not run or failed\n")
    assert "### memory per mode, computed" in head and "`python bench.py --shape tiny --reward_shape tiny" in head
    assert "exit 0)" in head and "| full, fp32 master + bf16 compute, 1 GPU |" in head
    skipped = re.findall(r"^- (\w+) .*: (.+)$", notrun, re.M)
    assert ("vLLM", "no GPU") in [(n, why) for n, why in skipped]
    names = {"gen1b", "gen7b", "score", "train", "mem8bit", "memlora", "memfull", "diffusion", "nccl_ddp", "nccl_fsdp"}
    names |= {"vllmfull", "fastlora", "vllmlora", "peer"}  # a stage with each sampling backend; the peer (TRL)
    assert {n for n, why in skipped if why == "not in BENCH_STEPS"} == names


def test_bench_on_a_local_model_directory(tmp_path, tiny_lm, capsys):
    """--model PATH times a saved model's own weights (here a tiny one) in every phase, labelled by its folder; the
    kit's sampler does the same work as model.generate and gives its greedy tokens."""
    stdout, rows = run_bench(tmp_path, "--model", tiny_lm, "--prompts", "4", "--new_tokens", "8", "--prompt_len", "8")
    assert {r["phase"] for r in rows} == {"generate", "score", "train"}
    assert {r["shape"] for r in rows} == {os.path.basename(tiny_lm)}
    gen = {r["variant"]: r for r in rows if r["phase"] == "generate"}
    assert gen["kit fastgen"]["tokens"] == gen["hf-64"]["tokens"] == 4 * 4 * 8  # b·K·new, K 4 by default
    assert gen["kit fastgen"]["greedy_same_as_generate"] == 1.0
    import bench

    with pytest.raises(SystemExit) as bad:
        bench.parse(["--model", str(tmp_path), "--phase", "memory"])
    assert bad.value.code == 2 and "--model runs --phase generate" in capsys.readouterr().err


def test_bench_peer_runs_the_kits_side_and_tabulates_each_run(tmp_path, tiny_lm):
    """bench_peer.py (the kit against TRL's GRPOTrainer; TRL is not in the kit's environment) on a tiny model: the
    kit's side runs in a process of its own on word problems in GSM8K's schema and reports each step's parts and the
    tokens sampled (b·K responses, each ≤ 4 tokens plus its ending); the table gives the median over runs of their
    mean step times (here on made-up runs)."""
    import bench_peer
    import demo
    from data import write_jsonl

    rows = demo.word_problems(40, seed=0)
    os.makedirs(tmp_path / "data")
    write_jsonl(str(tmp_path / "data" / "train.jsonl"), rows[8:])
    write_jsonl(str(tmp_path / "data" / "test.jsonl"), rows[:8])
    args = ["--model", tiny_lm, "--data", str(tmp_path / "data"), "--sides", "kit", "--runs", "1", "--steps", "2",
            "--prompts", "4", "--K", "2", "--max_new_tokens", "4", "--micro_batch_size", "4", "--threads", "1",
            "--out_dir", str(tmp_path / "bench")]  # fmt: skip
    sums = bench_peer.main(args)
    kit = sums["kit"]
    assert len(kit["lengths"]) == 1 and len(kit["lengths"][0]) == 2  # 1 run × 2 steps
    assert all(4 * 2 <= n <= 4 * 2 * 5 for r in kit["lengths"] for n in r)
    assert kit["range"][0] <= kit["step_s"] <= kit["range"][1] and kit["update_s"] > 0 and kit["sample_s"] > 0
    work = json.load(open(tmp_path / "bench" / "work.json"))
    assert len(work) == 2 * 4 and all(w["answer"].lstrip("-").isdigit() for w in work)  # the kit's prompts, in order
    fake = [{"steps": [{"step_s": t, "sample_s": 1, "score_s": 0, "update_s": t - 1, "tokens": 10, "truncated": 0}],
             "peak_gb": 1.0} for t in (3.0, 5.0, 4.0)]  # fmt: skip
    m = bench_peer.summary(fake)
    assert m["step_s"] == 4.0 and m["range"] == (3.0, 5.0) and m["tok_s"] == 2.5
    assert "| trl | 4.0 (3.0–5.0) |" in bench_peer.table({"kit": {**m, "step_s": 2.0}, "trl": m}, 8).replace(
        "2.00 |", "")  # fmt: skip
