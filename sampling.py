"""Step 1 of RAFT for every backend: K responses per prompt, cut at EOS or a stop string.

- fast (default): fastgen.py, each prompt prefilled once for its K samples, CUDA-graph decoding on a GPU; a model
  whose attention it cannot run, or a copy of the kit without fastgen.py, falls back to hf, said once.
- hf: `model.generate` on --gen_batch_size prompts × K rows per call, left-padded.
- vllm: vllm_gen.py, one in-process engine per process that receives the policy's weights after every stage.
Every backend samples with the kit's options only (temperature, top_k, top_p, max_new_tokens): nothing comes from
the model's generation_config. The new token ids of every backend go through the same `cut_response`, so EOS, stop
strings and truncation mean the same everywhere.
"""

import contextlib

import torch
from transformers import GenerationConfig

from data import encode_prompt
from dist import bar, pick_device, print0
from models import amp, dequantized_copy, full_weights, pad_id

try:  # fastgen.py may be left out of a copy: --gen_backend fast then samples with model.generate, said once
    import fastgen
except ModuleNotFoundError as e:
    if e.name != "fastgen":
        raise
    fastgen = None


def cut_response(ids: list[int], tok, eos_ids: set, stop: list[str]) -> dict:
    """The response in the new tokens `ids`: up to the first EOS, or up to (not including) the first stop string.
    end_id is the token to train as the end (the EOS generated, or tok.eos for a stop string), None when the
    response ran into max_new_tokens and so did not end by itself."""
    end_id = None
    for n, t in enumerate(ids):
        if t in eos_ids:
            ids, end_id = ids[:n], t
            break
    text = tok.decode(ids, skip_special_tokens=True)
    cuts = [p for p in (text.find(s) for s in stop) if p >= 0]
    if cuts:  # keep the longest token prefix whose text stays before the stop string (binary search over decodes)
        p, lo, hi = min(cuts), 0, len(ids)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if len(tok.decode(ids[:mid], skip_special_tokens=True)) <= p else (lo, mid - 1)
        ids, end_id = ids[:lo], tok.eos_token_id
        text = tok.decode(ids, skip_special_tokens=True)
    return {"ids": ids, "text": text, "end_id": end_id}


def eos_ids(model, tok) -> set:
    # the model's own end tokens count too (chat models end a turn with their own token): an ending, not a setting
    ids = model.generation_config.eos_token_id
    out = {tok.eos_token_id} | set(ids if isinstance(ids, (list, tuple)) else [ids])
    out.discard(None)
    return out


@torch.no_grad()
def generate(model, tok, prompts: list[str], K: int, cfg, desc="sample", engine=None) -> list[list[dict]]:
    """K responses for each prompt -> [len(prompts)][K] dicts of cut_response, on cfg.gen_backend."""
    model.eval()
    enc = [encode_prompt(tok, p) for p in prompts]
    ends = eos_ids(model, tok)
    if engine is not None:  # --gen_backend vllm: the engine already holds the policy's weights
        import vllm_gen

        seed = int(torch.randint(2**31 - 1, (1,)))  # from torch's RNG, which the caller seeded by (seed, stage, rank)
        new = vllm_gen.sample(engine["llm"], enc, K, **_sampling(cfg), eos_ids=ends, lora=engine["lora"], seed=seed)
        return [[cut_response(ids, tok, ends, cfg.stop) for ids in row] for row in new]
    new, policy = None, model
    if cfg.gen_dequantized and getattr(model, "is_loaded_in_8bit", False):
        model = dequantized_copy(model)  # freed when this function returns
    with full_weights(model):  # an FSDP2 policy is gathered once for the whole phase
        # vllm without an engine: the policy under --generator_model, whose engine holds the generator
        if cfg.gen_backend in ("fast", "vllm") and not getattr(policy, "_fastgen_refused", False):
            why = "" if fastgen else "fastgen.py is not beside sampling.py (copy it for the fast sampler)"
            if not why:
                try:
                    new = fastgen.sample(
                        model, enc, K, **_sampling(cfg), eos_ids=ends, pad_id=pad_id(tok),
                        batch_prompts=cfg.gen_batch_size, cuda_graphs=cfg.cuda_graphs,
                        autocast_dtype=torch.bfloat16 if cfg.bf16 else None, progress=lambda it: bar(it, desc),
                    )  # fmt: skip
                except fastgen.Unsupported as e:  # decided at the first prefill, before any sample is drawn
                    why = str(e)
            if why:
                print0(f"--gen_backend fast: {why}; generating with model.generate instead")
                policy._fastgen_refused = True  # said once per policy (not per dequantized copy)
        if new is None:
            new = hf_generate(model, tok, enc, K, cfg, ends, desc)
    return [[cut_response(ids, tok, ends, cfg.stop) for ids in row] for row in new]


def _sampling(cfg) -> dict:
    return dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)


@contextlib.contextmanager
def plain_generation_config(model):
    """generate() fills every unset field from model.generation_config (repetition_penalty, no_repeat_ngram_size,
    suppress_tokens, ... that chat models ship): swap in an empty one, so only the kit's options apply."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = base.generation_config
    base.generation_config = GenerationConfig()
    try:
        yield
    finally:
        base.generation_config = saved


def hf_generate(model, tok, enc: list[list[int]], K: int, cfg, ends: set, desc: str) -> list:
    """--gen_backend hf: model.generate on --gen_batch_size prompts × K rows per call -> [prompt][K] new token ids."""
    pad = pad_id(tok)
    gc = GenerationConfig(
        do_sample=cfg.temperature > 0, temperature=cfg.temperature or None, top_k=cfg.top_k, top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens, pad_token_id=pad, eos_token_id=sorted(ends), stop_strings=cfg.stop or None,
    )  # fmt: skip
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))  # shortest first: less padding per batch
    out = [None] * len(enc)
    device = next(model.parameters()).device
    for s in bar(range(0, len(order), cfg.gen_batch_size), desc):
        idx = order[s : s + cfg.gen_batch_size]
        L = max(len(enc[i]) for i in idx)  # left padding: every prompt ends at column L, new tokens start there
        input_ids = torch.tensor([[pad] * (L - len(enc[i])) + enc[i] for i in idx])
        valid = torch.tensor([[0] * (L - len(enc[i])) + [1] * len(enc[i]) for i in idx])
        # K copies of each row (HF's num_return_sequences refuses K > 1 when greedy): [len(idx)·K, L + new]
        with amp(model, cfg.bf16), plain_generation_config(model):
            seqs = model.generate(
                input_ids=input_ids.repeat_interleave(K, 0).to(device),
                attention_mask=valid.repeat_interleave(K, 0).to(device),
                generation_config=gc, tokenizer=tok if cfg.stop else None,
            )  # fmt: skip
        new = seqs[:, L:].tolist()
        for r, i in enumerate(idx):
            out[i] = new[r * K : (r + 1) * K]
    return out


# ---- --gen_backend vllm: the engine's life is vllm_gen.py's; raft.py calls these whatever the backend -----------
def check_backend(cfg):
    """Checks of --gen_backend vllm that need no model (raft.py's validate): vLLM installed, in the version needed,
    a LoRA rank it serves, an engine dtype it runs."""
    if cfg.gen_backend == "vllm":
        import vllm_gen

        vllm_gen.check_installed()
        vllm_gen.lora_rank_limit(cfg.lora_r)
        gpu = pick_device(cfg.device).type == "cuda"
        vllm_gen.engine_dtype(cfg.vllm_dtype, cfg.bf16, gpu, cfg.lora_r > 0 and not cfg.generator_model)


def start_engine(cfg, model, device, work_dir: str, context: int):
    """A vLLM engine holding the policy's current weights for --gen_backend vllm; None for the other backends."""
    if cfg.gen_backend != "vllm":
        return None
    import vllm_gen

    return vllm_gen.start_engine(cfg, model, device, work_dir, context)


def sync_engine(engine, model, cfg):
    """After a stage's fine-tuning: the engine samples from the new policy from now on."""
    if engine is not None:
        import vllm_gen

        vllm_gen.sync_engine(engine, model, cfg)


def sleep_engine(engine, cfg):
    """On a GPU, free the engine's memory while the policy trains."""
    if engine is not None:
        import vllm_gen

        vllm_gen.sleep_engine(engine, cfg)
