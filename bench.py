"""Benchmarks of RAFT's three phases: the kit's code path against plain-HF baselines on the same inputs.

Generation, reward scoring and fine-tuning each run the kit's way and the plain-HF way; each row prints tokens/s, its
fraction of the compute roofline (model FLOPs over the measured matmul rate), the speed-up over each baseline and its
peak memory. --model PATH runs them on a local causal LM (its reward model: the same weights with a fresh score head),
with vLLM beside them where it is installed. --phase stage / diffusion times one raft.py / diffusion.py stage per
phase (--raft_args: raft.py options, such as a memory mode); --phase memory computes, not measures, GPU memory per
memory mode from bytes per parameter (plan.py plans the peaks, activations included, on fake tensors). Left out:
real weights without --model (random weights of Llama or SD-1.5 shapes, no hub access; speed and memory do not
depend on them), activations in the computed memory, runs of more than one process, and any pass/fail on speed.
Each row's workload, baselines and FLOP count: docs/speed.md; measured numbers: BENCHMARKS.md.

    python bench.py --shape tiny --phase all          # CPU, seconds: the smoke test (tests/test_bench.py)
    python bench.py --shape 1b --phase all            # one GPU: Llama-3.2-1B shape (1.5B parameters)
    python bench.py --model PATH                      # a local model's real weights: 16 prompts × K 4, 64 + 64 tokens
    python bench.py --shape 1b --phase stage          # one RAFT stage end to end (b=256, K=8), time per phase
    python bench.py --shape 7b --reward_shape 3b --phase memory --gen_batch_size 8   # computed GB per memory mode
"""

import argparse
import contextlib
import importlib.util
import json
import math
import os
import shlex
import tempfile
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig
from transformers import LlamaConfig
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

import dist
import fastgen
import raft
from models import amp, build_example
from reward import score_ids

SHAPES = {  # Llama shapes: the paper's LLaMA-7B, its 3B reward model (Open-LLaMA-3B), Llama-3.2-1B, and a toy
    "tiny": dict(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "3b": dict(
        hidden_size=3200,
        intermediate_size=8640,
        num_hidden_layers=26,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=[*SHAPES, "sd15"], default="tiny", help="sd15: --phase diffusion only")
    ap.add_argument("--model", default=None, help="a local causal LM directory instead of --shape (generate, score, "
                    "train; defaults b=16, K=4, 64 + 64 tokens; vLLM where installed)")  # fmt: skip
    ap.add_argument(
        "--reward_shape",
        choices=SHAPES,
        default=None,
        help="score: default --shape; stage: a reward model of this shape (default: a word-count reward, no model)",
    )
    ap.add_argument(
        "--phase", choices=["generate", "score", "train", "stage", "diffusion", "memory", "all"], default="all"
    )
    ap.add_argument("--ranks", type=int, default=8, help="memory: GPUs that FSDP2 shards over (the paper's 8×A40)")
    ap.add_argument("--prompts", type=int, default=None, help="b (default 64 on a GPU, 16 for tiny; stage: 256)")
    ap.add_argument("--K", type=int, default=None, help="default 8 (--model: 4)")
    ap.add_argument("--prompt_len", type=int, default=None, help="default 128 (tiny: 16)")
    ap.add_argument("--new_tokens", type=int, default=None, help="default 128 (tiny: 16)")
    ap.add_argument("--gen_batch_size", type=int, default=64, help="prompts per call: hf-B baseline and fastgen")
    ap.add_argument("--hf1_prompts", type=int, default=4, help="prompts timed for the one-prompt-per-call baseline")
    ap.add_argument("--reward_batch_size", type=int, default=32)
    ap.add_argument("--micro_batch_size", type=int, default=8)
    ap.add_argument("--no_cuda_graphs", action="store_true")
    ap.add_argument("--vllm", action="store_true", help="generate: also time vllm_gen on the same work (needs vLLM; "
                    "--model: on whenever vLLM is installed)")  # fmt: skip
    ap.add_argument("--raft_args", default="", help='stage: extra raft.py options, e.g. "--lora_r 16 --bf16"')
    ap.add_argument("--plan_dir", default=None, help="stage: write the models' configs here, print the stage's "
                    "raft.py options for plan.py and exit (bench_gpu.sh plans each stage first)")  # fmt: skip
    ap.add_argument("--json", default=None, help="also append every row as JSON to this file")
    a = ap.parse_args(argv)
    a.stage_reward = a.reward_shape
    if a.model:
        if a.phase not in ("generate", "score", "train", "all"):
            ap.error("--model runs --phase generate, score, train or all")
        if not os.path.isfile(os.path.join(a.model, "config.json")):
            ap.error(f"--model {a.model}: not a local model directory (no config.json)")
        a.shape = os.path.basename(os.path.normpath(a.model))  # the rows' label
        a.vllm = a.vllm or importlib.util.find_spec("vllm") is not None
    tiny = a.shape == "tiny"
    a.K = a.K or (4 if a.model else 8)
    a.prompts = a.prompts or (256 if a.phase == "stage" else 16 if tiny or a.model else 64)
    a.prompt_len = a.prompt_len or (16 if tiny else 64 if a.model else 128)
    a.new_tokens = a.new_tokens or (16 if tiny else 64 if a.model else 128)
    a.reward_shape = a.reward_shape or a.shape
    sizes = ("prompts", "K", "prompt_len", "new_tokens", "gen_batch_size", "hf1_prompts", "reward_batch_size",
             "micro_batch_size", "ranks")  # fmt: skip
    for name in sizes:
        if getattr(a, name) < 1:
            ap.error(f"--{name} {getattr(a, name)}: must be ≥ 1")
    if not a.model and (a.shape == "sd15") != (a.phase == "diffusion") and not (tiny and a.phase == "diffusion"):
        ap.error("--phase diffusion takes --shape sd15 (or tiny); the other phases take a Llama shape")
    if raft.WORLD > 1:
        ap.error("bench.py runs one process; under torchrun use --nproc_per_node 1")
    return a


DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEV.type == "cuda" else torch.float32


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def timed(row: dict):
    """Fills row["secs"] and row["peak_gib"] (GPU memory allocated at the peak; 0 on a CPU)."""
    sync()
    if DEV.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    yield
    sync()
    row["secs"] = time.perf_counter() - t
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if DEV.type == "cuda" else 0.0


def matmul_rate(runs: int = 5) -> float:
    """The measured dense matmul FLOP/s in the compute dtype: the roofline every row is compared with. The best of
    `runs` runs of about 0.2 s each (a few ms, as ten 8192² matmuls take on an H100, is mostly launch and clock
    ramp-up); 0.05 s each on a CPU, whose figure is only a smoke number."""
    n = 8192 if DEV.type == "cuda" else 512
    x = torch.randn(n, n, device=DEV, dtype=DTYPE)
    for _ in range(3):
        x @ x
    sync()
    t = time.perf_counter()
    x @ x
    sync()
    reps = max(1, round((0.2 if DEV.type == "cuda" else 0.05) / (time.perf_counter() - t)))
    best = math.inf
    for _ in range(runs):
        t = time.perf_counter()
        for _ in range(reps):
            x @ x
        sync()
        best = min(best, time.perf_counter() - t)
    return reps * 2 * n**3 / best


def build(shape: str, cls=LlamaForCausalLM, **kw):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        **SHAPES[shape], max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw
    )
    with torch.device(DEV):
        model = cls(cfg).to(DTYPE).eval()
    return model


def load(a, reward=False):
    """The policy (or, reward=True, the reward model) that a phase times: --model's weights (a reward model gets a
    fresh score head on them), else a random model of --shape (--reward_shape)."""
    if not a.model:
        return build(a.reward_shape, LlamaForSequenceClassification, num_labels=1) if reward else build(a.shape)
    cls = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    torch.manual_seed(0)  # the score head's initialisation
    model = cls.from_pretrained(a.model, dtype=DTYPE, **({"num_labels": 1} if reward else {})).to(DEV).eval()
    if reward and model.config.pad_token_id is None:  # a batch's last real token is found through the pad id
        model.config.pad_token_id = model.config.eos_token_id
    return model


def vocab(model) -> int:
    return model.config.vocab_size


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def matmul_params(model) -> tuple[int, int]:
    """(N, N_head): the parameters that do matmuls (every nn.Linear weight, a tied one once; the input embedding is
    a lookup and does none) and, of those, the output head's (the LM head, or a classifier's score head)."""
    weights = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    head = model.get_output_embeddings() if model.get_output_embeddings() is not None else model.score
    return sum(weights.values()), head.weight.numel()


def greedy_reference(model, prompts: list[list[int]], new_tokens: int, eos_id: int = 2) -> list[list[int]]:
    """model.generate's greedy tokens, each row up to and including its EOS (generate pads after EOS)."""
    ids = torch.tensor(prompts, device=DEV)
    ref = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        generation_config=GenerationConfig(
            do_sample=False, max_new_tokens=new_tokens, pad_token_id=0, eos_token_id=eos_id
        ),
    )[:, ids.shape[1] :].tolist()
    return [r[: r.index(eos_id) + 1] if eos_id in r else r for r in ref]


def agreement(ref: list[list[int]], got: list[list[int]]) -> float:
    """The share of positions where greedy tokens equal generate's on the same prompts. Like with like: both stop at
    EOS (generate with min_new_tokens would mask EOS, which the kit's samplers never do, and report a disagreement
    that is not there); a row is compared up to and including its EOS, a length mismatch counting as disagreement
    on the extra positions."""
    same = sum(x == y for r, g in zip(ref, got) for x, y in zip(r, g))
    return same / sum(max(len(r), len(g)) for r, g in zip(ref, got))


def greedy_agreement(model, prompts: list[list[int]], new_tokens: int, cuda_graphs: bool, eos_id: int = 2) -> float:
    """agreement of fastgen's greedy tokens with model.generate's."""
    got = fastgen.sample(
        model, prompts, 1, max_new_tokens=new_tokens, eos_ids={eos_id}, pad_id=0, temperature=0, cuda_graphs=cuda_graphs
    )
    return agreement(greedy_reference(model, prompts, new_tokens, eos_id), [r[0] for r in got])


def eos_of(model) -> int:
    """The model's (first) EOS id, 2 for the random shapes, whose configs name none."""
    eos = model.generation_config.eos_token_id
    return eos[0] if isinstance(eos, (list, tuple)) else 2 if eos is None else eos


def gen_prompts(a, V: int) -> list[list[int]]:
    """b prompts of --prompt_len random token ids (the same in every variant and in vLLM's row)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, V, (a.prompts, a.prompt_len), generator=g).tolist()


def generate_rows(a, rate: float) -> list[dict]:
    model = load(a)
    P, (N, _) = n_params(model), matmul_params(model)
    prompts = gen_prompts(a, vocab(model))
    gc = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=a.new_tokens,
        min_new_tokens=a.new_tokens,
        pad_token_id=0,
        eos_token_id=2,
    )

    def hf(ps, per_call):
        n = 0
        for s in range(0, len(ps), per_call):
            ids = torch.tensor(ps[s : s + per_call], device=DEV).repeat_interleave(a.K, 0)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
            n += out[:, ids.shape[1] :].numel()
        return n

    def fast(ps, graphs=not a.no_cuda_graphs):
        out = fastgen.sample(
            model,
            ps,
            a.K,
            max_new_tokens=a.new_tokens,
            eos_ids=set(),
            pad_id=0,
            batch_prompts=a.gen_batch_size,
            cuda_graphs=graphs,
        )
        return sum(len(s) for row in out for s in row)

    rows = []
    hf(prompts[:1], 1)  # warm-up: kernels, cuBLAS handles
    fast(prompts[:1])
    for name, fn in (
        (f"hf-1 ({min(a.hf1_prompts, a.prompts)} prompts)", lambda: hf(prompts[: a.hf1_prompts], 1)),
        (f"hf-{a.gen_batch_size}", lambda: hf(prompts, a.gen_batch_size)),
        ("kit fastgen", lambda: fast(prompts)),
    ):
        row = {"phase": "generate", "shape": a.shape, "params": P, "matmul_params": N, "variant": name}
        try:
            with timed(row):
                row["tokens"] = fn()
        except torch.OutOfMemoryError:
            row.update(tokens=0, secs=math.nan, peak_gib=math.nan, note="out of memory")
            torch.cuda.empty_cache()
        row["tok_s"] = row["tokens"] / row["secs"]
        row["frac_roofline"] = row["tok_s"] * 2 * N / rate  # model FLOPs: 2·N per new token
        rows.append(row)
    # greedy: does the fast path give model.generate's tokens? (bf16 on a GPU may split ties differently)
    rows[-1]["greedy_same_as_generate"] = greedy_agreement(model, prompts[:4], a.new_tokens, not a.no_cuda_graphs,
                                                           eos_of(model))  # fmt: skip
    return rows


def vllm_rows(a, rate: float, gen: list[dict]) -> list[dict]:
    """vLLM's row, run after every other phase (its engine takes over torch's threads on a CPU and sizes its KV cache
    from the GPU memory free when it starts), on the generate rows' weights and prompts; a failure (vLLM's versions,
    memory) is a note, not a lost table."""
    if not gen:
        return []
    try:
        model = load(a)
        prompts, eos = gen_prompts(a, vocab(model)), eos_of(model)
        ref = greedy_reference(model, prompts[:4], a.new_tokens, eos)
        with tempfile.TemporaryDirectory() as d:
            if not a.model:
                model.save_pretrained(d)  # the same random weights for vLLM
            del model  # vLLM sizes its KV cache from the GPU memory free when it starts
            if DEV.type == "cuda":
                torch.cuda.empty_cache()
            return [vllm_row(a, a.model or d, prompts, ref, eos, gen[0]["params"], gen[0]["matmul_params"], rate)]
    except (Exception, SystemExit) as e:
        print(f"note: vllm not measured ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return []


def vllm_row(a, model_dir: str, prompts, ref, eos: int, P: int, N: int, rate: float) -> dict:
    """The same work through the kit's vLLM backend (vllm_gen.make_engine and sample, as --gen_backend vllm runs
    them; a reference point, not a baseline): n=K samples per prompt, exactly --new_tokens each (no EOS),
    temperature 1, no top-k or top-p; bf16 on a GPU, fp32 on a CPU. Not timed: the engine's start-up and a warm-up
    call. Its greedy check: vllm_gen's greedy tokens against model.generate's."""
    import vllm_gen

    llm = vllm_gen.make_engine(
        model_dir, dtype="bfloat16" if DEV.type == "cuda" else "float32", max_model_len=a.prompt_len + a.new_tokens
    )  # 0.3 of the GPU: the share --gen_backend vllm takes by default
    kw = dict(max_new_tokens=a.new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_ids=set(), seed=0)
    vllm_gen.sample(llm, prompts[:1], a.K, **kw)  # warm-up
    row = {"phase": "generate", "shape": a.shape, "params": P, "matmul_params": N, "variant": "kit vllm_gen"}
    with timed(row):
        out = vllm_gen.sample(llm, prompts, a.K, **kw)
    row["peak_gib"] = math.nan  # vLLM allocates through its own pool: torch's peak here says nothing
    row["tokens"] = sum(len(s) for r in out for s in r)
    row["tok_s"] = row["tokens"] / row["secs"]
    row["frac_roofline"] = row["tok_s"] * 2 * N / rate
    got = vllm_gen.sample(llm, prompts[: len(ref)], 1, **{**kw, "temperature": 0.0, "eos_ids": {eos}})
    row["greedy_same_as_generate"] = agreement(ref, [r[0] for r in got])
    return row


def score_rows(a, rate: float) -> list[dict]:
    model = load(a, reward=True)
    P, (N, _) = n_params(model), matmul_params(model)
    g = torch.Generator().manual_seed(1)
    V = vocab(model)
    lens = torch.randint(
        a.prompt_len + a.new_tokens // 8, a.prompt_len + a.new_tokens + 1, (a.prompts * a.K,), generator=g
    ).tolist()
    texts = [torch.randint(3, V, (n,), generator=g).tolist() for n in lens]
    rows = []
    score_ids(model, texts[:2], 2, 0)  # warm-up
    n1 = max(1, len(texts) // 16)
    for name, fn, n in (
        ("one text per call", lambda: score_ids(model, texts[:n1], 1, 0), sum(lens[:n1])),
        (
            f"kit score_ids (batch {a.reward_batch_size})",
            lambda: score_ids(model, texts, a.reward_batch_size, 0),
            sum(lens),
        ),
    ):
        row = {"phase": "score", "shape": a.reward_shape, "params": P, "matmul_params": N, "variant": name, "tokens": n}
        with timed(row):
            fn()
        row["tok_s"] = n / row["secs"]
        row["frac_roofline"] = row["tok_s"] * 2 * N / rate  # model FLOPs: 2·N per text token
        rows.append(row)
    return rows


def collate(examples, pad_id: int):
    """The baseline's right-padded batch: input_ids, attention_mask, labels [B, T]; padding masked, no loss."""
    T = max(len(x) for x, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for r, (x, y) in enumerate(examples):
        ids[r, : len(x)], labels[r, : len(y)], mask[r, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, mask, labels


def train_rows(a, rate: float) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    V = AutoConfig.from_pretrained(a.model).vocab_size if a.model else SHAPES[a.shape]["vocab_size"]
    examples = []
    for _ in range(a.prompts):
        p = torch.randint(
            3, V, (int(torch.randint(a.prompt_len // 4, a.prompt_len + 1, (1,), generator=g)),), generator=g
        ).tolist()
        r = torch.randint(
            3, V, (int(torch.randint(a.new_tokens // 8, a.new_tokens + 1, (1,), generator=g)),), generator=g
        ).tolist()
        examples.append(build_example(p, r, 2))
    tokens = sum(len(x) for x, _ in examples)
    labelled = sum(sum(t != -100 for t in y[1:]) for _, y in examples)  # positions with a loss: the head's work
    cfg = raft.Config(
        epochs=1,
        lr=1e-5,
        train_batch_size=max(a.micro_batch_size, 32),
        micro_batch_size=a.micro_batch_size,
        bf16=DEV.type == "cuda",
    )

    def baseline(model, examples):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        model.train()
        for s in range(0, len(examples), cfg.train_batch_size):
            batch = examples[s : s + cfg.train_batch_size]
            for m in range(0, len(batch), cfg.micro_batch_size):
                ids, mask, labels = [t.to(DEV) for t in collate(batch[m : m + cfg.micro_batch_size], 0)]
                with amp(model, cfg.bf16):
                    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    rows = []
    for name, fn in (
        ("plain HF loss, padded", baseline),
        ("kit finetune", lambda m, exs: raft.finetune(m, exs, cfg, seed=0)),
    ):
        model = load(a).float()  # fp32 master weights, bf16 autocast: the kit's --bf16 full fine-tuning
        P, (N, head) = n_params(model), matmul_params(model)
        flops = 6 * ((N - head) * tokens + head * labelled)  # model FLOPs: the head's work only where a label is
        row = {"phase": "train", "shape": a.shape, "params": P, "matmul_params": N, "variant": name, "tokens": tokens}
        try:
            fn(model, examples[: cfg.train_batch_size])  # warm-up, untimed: one-time costs on no variant's clock
            with timed(row):
                fn(model, examples)
        except torch.OutOfMemoryError:
            row.update(secs=math.nan, peak_gib=math.nan, note="out of memory")
        row["tok_s"] = tokens / row["secs"]
        row["frac_roofline"] = flops / row["secs"] / rate
        rows.append(row)
        del model
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def word_tokenizer(V: int):
    """A word-level tokenizer with V ids ("w3" is id 3): random-token texts survive a decode and re-encode."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, V)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_random(d: str, shape: str, cls=LlamaForCausalLM, **kw) -> str:
    """A random model of `shape` and its word tokenizer saved to d; the GPU memory it used is given back, so the
    stage's peak memory is raft.py's own."""
    model = build(shape, cls, **kw)
    model.save_pretrained(d)
    word_tokenizer(SHAPES[shape]["vocab_size"]).save_pretrained(d)
    del model
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    return d


def stage_args(a, policy: str, reward: str, data: str, out_dir: str) -> list[str]:
    """raft.py's options for --phase stage (one stage on b prompts, K samples each, 2 epochs)."""
    return (
        [
            "--model",
            policy,
            "--dataset",
            data,
            "--reward",
            reward,
            "--prompts_per_stage",
            str(a.prompts),
            "--K",
            str(a.K),
            "--max_new_tokens",
            str(a.new_tokens),
            "--eval_prompts",
            "16",
            "--stages",
            "1",
            "--epochs",
            "2",
            "--micro_batch_size",
            str(a.micro_batch_size),
            "--train_batch_size",
            "32",
            "--out_dir",
            out_dir,
            "--gen_batch_size",
            str(a.gen_batch_size),
            "--reward_batch_size",
            str(a.reward_batch_size),
            "--max_prompt_tokens",
            str(a.prompt_len),
        ]
        + (["--bf16"] if DEV.type == "cuda" else [])
        + shlex.split(a.raft_args)
    )


def plan_args(a) -> list[str]:
    """--plan_dir: the stage's models as configs in that directory (no weights, no device touched) and raft.py's
    options for plan.py, which bench_gpu.sh runs before a stage to skip one that cannot fit the GPU."""
    d = a.plan_dir
    LlamaConfig(**SHAPES[a.shape], pad_token_id=0).save_pretrained(os.path.join(d, "m"))
    reward = "bench:word_count"
    if a.stage_reward:
        LlamaConfig(**SHAPES[a.stage_reward], pad_token_id=0, num_labels=1).save_pretrained(os.path.join(d, "rm"))
        reward = os.path.join(d, "rm")
    return stage_args(a, os.path.join(d, "m"), reward, os.path.join(d, "p.jsonl"), os.path.join(d, "run"))


def stage_rows(a) -> list[dict]:
    """One RAFT stage through raft.main on a random-weight model saved to a temporary directory: time and (GPU)
    peak memory per phase."""
    V = SHAPES[a.shape]["vocab_size"]
    with tempfile.TemporaryDirectory() as d:
        policy = save_random(os.path.join(d, "m"), a.shape)
        reward = (
            save_random(os.path.join(d, "rm"), a.stage_reward, LlamaForSequenceClassification, num_labels=1)
            if a.stage_reward
            else "bench:word_count"
        )
        g = torch.Generator().manual_seed(3)
        with open(os.path.join(d, "p.jsonl"), "w") as f:
            for _ in range(a.prompts + 16):
                f.write(
                    json.dumps(
                        {
                            "prompt": " ".join(
                                f"w{i}" for i in torch.randint(3, V, (a.prompt_len - 1,), generator=g).tolist()
                            )
                        }
                    )
                    + "\n"
                )
        args = stage_args(a, policy, reward, os.path.join(d, "p.jsonl"), os.path.join(d, "run"))
        raft.main(args)
        with open(os.path.join(d, "run", "metrics.jsonl")) as f:
            m = [json.loads(line) for line in f][-1]
    variant = (
        f"b={a.prompts} K={a.K}"
        + (f" reward {a.stage_reward}" if a.stage_reward else "")
        + (f" {a.raft_args}" if a.raft_args else "")
        + (" (torchrun)" if raft.DIST else "")
    )
    return [{"phase": "stage", "shape": a.shape, "variant": variant, **phase_metrics(m)}]


def phase_metrics(m: dict) -> dict:
    """A stage's seconds and (GPU) peak GiB per phase, as dist.phase records them in raft.py and diffusion.py."""
    return {k: v for k, v in m.items() if k.startswith(("time_", "peak_gib_"))}


def diffusion_rows(a) -> list[dict]:
    """One diffusion.py stage on random weights of SD 1.5's shapes (or a toy UNet for --shape tiny): time per phase."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel

    import diffusion

    tiny = a.shape == "tiny"
    tok = ByT5Tokenizer()
    torch.manual_seed(0)
    text = CLIPTextModel(
        CLIPTextConfig(  # CLIP ViT-L/14's text tower (SD 1.5's), or a toy
            vocab_size=len(tok) if tiny else 49408,
            hidden_size=32 if tiny else 768,
            intermediate_size=64 if tiny else 3072,
            num_hidden_layers=2 if tiny else 12,
            num_attention_heads=4 if tiny else 12,
            max_position_embeddings=16 if tiny else 77,
            hidden_act="quick_gelu",
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    unet = UNet2DConditionModel(  # SD 1.5's UNet: the diffusers defaults with 768-wide cross-attention
        **(
            dict(
                sample_size=8,
                block_out_channels=(32, 64),
                layers_per_block=1,
                norm_num_groups=8,
                cross_attention_dim=32,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                attention_head_dim=8,
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            )
            if tiny
            else dict(sample_size=64, cross_attention_dim=768)
        )
    )
    vae = AutoencoderKL(  # SD's VAE: 4 levels (8× downsampling), 4 latent channels
        down_block_types=("DownEncoderBlock2D",) * (3 if tiny else 4),
        up_block_types=("UpDecoderBlock2D",) * (3 if tiny else 4),
        block_out_channels=(16, 32, 32) if tiny else (128, 256, 512, 512),
        layers_per_block=1 if tiny else 2,
        latent_channels=4,
        norm_num_groups=8 if tiny else 32,
        sample_size=32 if tiny else 512,
        scaling_factor=0.18215,
    )
    sched = diffusion.sd15_scheduler()
    with tempfile.TemporaryDirectory() as d:
        for name, part in dict(tokenizer=tok, text_encoder=text, unet=unet, vae=vae, scheduler=sched).items():
            part.save_pretrained(os.path.join(d, "sd", name))
        args = (
            [
                "--model",
                os.path.join(d, "sd"),
                "--reward",
                "brightness",
                "--stages",
                "1",
                "--out_dir",
                os.path.join(d, "run"),
                "--K",
                str(a.K),
            ]
            + (["--resolution", "32", "--steps", "4", "--prompts_per_stage", "4", "--eval_images", "1"] if tiny else [])
            + (["--bf16"] if DEV.type == "cuda" else [])
        )
        m = diffusion.main(args)[-1]
    return [
        {
            "phase": "stage",
            "shape": a.shape,
            "variant": f"diffusion b={m.get('n_selected')} K={a.K}",
            **phase_metrics(m),
        }
    ]


def param_counts(shape: str, cls=LlamaForCausalLM, lora_r: int = 16, **kw) -> dict:
    """Parameter counts of a Llama shape from a meta-device model (no memory, any size): all, those in the decoder
    layers' linear projections (what bitsandbytes quantizes), the rest (embeddings, LM head, norms), and the LoRA
    adapters of rank lora_r on every linear layer but the head (--lora_target_modules all-linear)."""
    cfg = LlamaConfig(**SHAPES[shape], pad_token_id=0, **kw)
    with torch.device("meta"):
        model = cls(cfg)
    head = model.get_output_embeddings() if model.get_output_embeddings() is not None else model.score
    lins = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}."]
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in lins)
    lora = sum(lora_r * (m.in_features + m.out_features) for m in lins if m is not head)
    heads = cfg.num_key_value_heads
    kv_token = 2 * cfg.num_hidden_layers * heads * (cfg.hidden_size // cfg.num_attention_heads) * 2  # bf16 K and V
    return {
        "total": total,
        "linear": linear,
        "rest": total - linear,
        "head": head.weight.numel(),
        "layers": cfg.num_hidden_layers,
        "lora": lora,
        "kv_token_bytes": kv_token,
        "int8_scales": sum(m.out_features for m in lins),
    }


def kv_bytes(p: dict, prompts: int, K: int, prompt_len: int, new_tokens: int) -> int:
    """fastgen's KV cache for `prompts` prompts × K samples: each prompt's keys and values once, each sample's new
    tokens' once per sample (p from param_counts)."""
    return prompts * (prompt_len + K * new_tokens) * p["kv_token_bytes"]


def memory_rows(a) -> list[dict]:
    """Computed, not measured: GPU memory of one RAFT stage per memory mode (weights, optimizer, KV cache, reward
    model; activations excluded), from bytes per parameter and per cached token of --shape / --reward_shape: the
    arithmetic of each mode. plan.py plans the peaks with activations (docs/planning.md compares the two);
    `--phase stage --raft_args ...` measures them on a GPU."""
    G = 1e9
    p, r = param_counts(a.shape), param_counts(a.reward_shape, LlamaForSequenceClassification, num_labels=1)
    int8 = p["linear"] + 4 * p["int8_scales"] + 4 * p["rest"]  # int8 projections + fp32 row scales; the rest fp32
    reward = {"bf16": 2 * r["total"], "int8": r["linear"] + 4 * r["int8_scales"] + 2 * r["rest"]}
    kv = kv_bytes(p, a.gen_batch_size, a.K, a.prompt_len, a.new_tokens)
    n, P, lora = a.ranks, p["total"], p["lora"]
    # Training's transient, the larger of two moments: AdamW's foreach step allocates a temporary as large as the
    # trained parameters in fp32 (its sqrt of exp_avg_sq), after the backward has freed autocast's bf16 copies of the
    # fp32 weights, which are held from the forward to the backward (2 bytes per matmul parameter). LoRA: the
    # adapters' step temporary (their bf16 copies are smaller; the base is bf16 or int8 already). FSDP2 (bf16
    # param_dtype): the sharded step temporary, or the gathered bf16 weights of the root group (embeddings, head)
    # and one layer at a time.
    step_lora, step_full = 4 * lora, max(4 * P, 2 * (p["linear"] + p["head"]))
    step_fsdp = max(4 * P / n, 2 * (p["rest"] + p["linear"] / p["layers"]))
    modes = [  # (name, resident weights, grads + AdamW states, training transient, extra while sampling, reward)
        ("8-bit base + LoRA", int8 + 4 * lora, 12 * lora, step_lora, 0, reward["int8"]),
        ("8-bit base + LoRA, --gen_dequantized", int8 + 4 * lora, 12 * lora, step_lora, 2 * P, reward["int8"]),
        ("bf16 base + LoRA", 2 * P + 4 * lora, 12 * lora, step_lora, 0, reward["bf16"]),
        ("full, fp32 master + bf16 compute, 1 GPU", 4 * P, 12 * P, step_full, 2 * P, reward["bf16"]),
        (f"full, FSDP2 over {n} GPUs", 4 * P / n, 12 * P / n, step_fsdp, 2 * P, reward["bf16"]),
    ]
    rows = []
    for name, weights, train, transient, sample, rm in modes:
        rows.append(
            {
                "phase": "memory",
                "shape": a.shape,
                "reward_shape": a.reward_shape,
                "variant": name,
                "params": p["total"],
                "weights_gb": weights / G,
                "train_extra_gb": train / G,
                "train_transient_gb": transient / G,
                "sample_extra_gb": sample / G,
                "kv_gb": kv / G,
                "reward_gb": rm / G,
                "sample_peak_gb": (weights + sample + kv + rm) / G,
                "train_peak_gb": (weights + train + transient + rm) / G,
            }
        )
    return rows


def memory_table(rows: list[dict], a) -> str:
    out = [
        f"computed, not measured: {a.shape} policy, {a.reward_shape} reward, --gen_batch_size {a.gen_batch_size} "
        f"× K {a.K}, {a.prompt_len} + {a.new_tokens} tokens; GB = 1e9 bytes; activations excluded (plan.py plans them)",
        "| mode | weights | + training (grads, AdamW) | + training transient (AdamW step / bf16 copies) "
        "| + sampling copy | KV cache | reward | sampling peak | training peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['variant']} | {r['weights_gb']:.1f} | {r['train_extra_gb']:.1f} | {r['train_transient_gb']:.1f} "
            f"| {r['sample_extra_gb']:.1f} "
            f"| {r['kv_gb']:.1f} | {r['reward_gb']:.1f} | {r['sample_peak_gb']:.1f} | "
            f"{r['train_peak_gb']:.1f} |"
        )
    return "\n".join(out)


def word_count(prompts, responses):
    """The stage benchmark's reward (cheap, so the stage's time is the policy's)."""
    return [float(len(r.split())) for r in responses]


def table(rows: list[dict]) -> str:
    """One markdown table; speed-ups are over the other rows of the same phase."""
    out = [
        "| phase | shape | variant | tokens | s | tok/s | of roofline (model FLOPs) | speed-up over baselines "
        "| peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["phase"] == "stage":
            peak = ", ".join(
                f"{p} {r['peak_gib_' + p]:.1f}" for p in ("sample", "rank", "train", "eval") if "peak_gib_" + p in r
            )
            out.append(
                f"| stage | {r['shape']} | {r['variant']} | | sample {r['time_sample']:.1f}, rank "
                f"{r['time_rank']:.1f}, train {r['time_train']:.1f}, eval {r['time_eval']:.1f} | | | | "
                f"{peak} |"
            )
            continue
        base = [b for b in rows if b["phase"] == r["phase"] and b is not r and "kit" not in b["variant"]]
        ups = ", ".join(
            f"{r['tok_s'] / b['tok_s']:.1f}× {b['variant'].split(' (')[0]}"
            for b in base
            if "kit" in r["variant"] and b["tok_s"] > 0
        )
        note = f" (greedy = generate: {r['greedy_same_as_generate']:.3f})" if "greedy_same_as_generate" in r else ""
        out.append(
            f"| {r['phase']} | {r['shape']} | {r['variant']}{note} | {r['tokens']} | {r['secs']:.2f} | "
            f"{r['tok_s']:,.0f} | {r['frac_roofline']:.1%} | {ups} | {r['peak_gib']:.1f} |"
        )
    return "\n".join(out)


def main(argv=None):
    a = parse(argv)
    if a.plan_dir:
        args = plan_args(a)
        print(shlex.join(args), flush=True)
        return args
    rate = matmul_rate()
    dev = torch.cuda.get_device_name() if DEV.type == "cuda" else "CPU"
    print(
        f"device {dev}, torch {torch.__version__}, {DTYPE}; matmul {rate / 1e12:.2f} TFLOP/s; b={a.prompts} "
        f"K={a.K} prompt {a.prompt_len} tokens, {a.new_tokens} new",
        flush=True,
    )
    rows = []
    for phase, fn in (("generate", generate_rows), ("score", score_rows), ("train", train_rows)):
        if a.phase in (phase, "all"):
            rows += fn(a, rate)
    if a.vllm:  # last, beside the generate rows
        gen = [r for r in rows if r["phase"] == "generate"]
        rows[len(gen) : len(gen)] = vllm_rows(a, rate, gen)
    if a.phase == "stage":
        rows += stage_rows(a)
    if a.phase == "diffusion":
        rows += diffusion_rows(a)
    if a.phase == "memory":
        rows += memory_rows(a)
        print(memory_table(rows, a))
    else:
        print(table(rows))
    if a.json:
        with open(a.json, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "device": dev, "matmul_tflops": rate / 1e12}) + "\n")
    return rows


if __name__ == "__main__":
    main()
    dist.exit_worker()  # under torchrun: see dist.exit_worker
