"""The policy and what is computed with it: loading in a memory mode, torchrun's engines, and the log-probabilities
of (prompt, response) rows that SFT, the KL term and perplexity share.

- `load_policy`: full fine-tuning (fp32 master weights; --bf16 computes under autocast, since a 2e-5 AdamW step is
  below half a bf16 unit of a typical weight), LoRA on a frozen base (bf16 under --bf16), or LoRA on an 8-bit base.
  Under torchrun full fine-tuning is sharded with FSDP2, one group per decoder layer; LoRA is wrapped in DDP by the
  fine-tune step. `full_weights` gathers an FSDP2 model once for a whole inference phase; `full_state_dict` for saving.
- `example_logprobs`: examples packed into rows, positions restarting per example, so nothing attends across
  examples; the samples of one prompt hold it once, under a 4-D mask; the LM head runs only where a label is.
  Packing and sharing are checked once per model against one example per row; a model whose attention ignores
  restarted positions (OPT, BLOOM) gets one example per row instead. `deal` spreads a batch over ranks by prompt.
- `dequantized_copy` (--gen_dequantized) and `save_merged` (--merge_lora).
"""

import contextlib
import copy
import dataclasses
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from data import encode_prompt, save_model_dir
from dist import RANK, WORLD, gather, print0


def load_tokenizer(path: str, cfg):
    """The tokenizer of a model and its context length (from its config), without loading the weights."""
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        mcfg = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise SystemExit(
            f"--model {path!r}: cannot load its tokenizer and config (a path that does not exist?): "
            f"{str(e).splitlines()[0]}"
        )
    if tok.eos_token_id is None:
        raise SystemExit(f"--model {path!r}: the tokenizer has no EOS token; set one in its tokenizer_config.json")
    return tok, getattr(mcfg, "max_position_embeddings", None) or getattr(mcfg, "n_positions", None) or 1 << 30


def load_policy(cfg, device, checkpoint: Optional[str] = None, shard=False, frozen=False, score_head=False):
    """The policy and its tokenizer: cfg.model, or a stage checkpoint (a full model, or LoRA adapters on cfg.model),
    in the memory mode of cfg (fp32 / bf16 base + LoRA / 8-bit base + LoRA). shard (raft.py passes True under
    torchrun): full fine-tuning is sharded with FSDP2. score_head (rm.py): the causal LM with a one-output
    sequence-classification head instead of its LM head, trained under LoRA too. One-line errors for the usual
    mistakes."""
    base = checkpoint if checkpoint and not cfg.lora_r else cfg.model
    # bf16 storage for weights that do not train (a LoRA base, a frozen reference or generator); trained full weights
    # stay fp32 (master weights) and --bf16 computes in bf16 through autocast
    kw = {
        "dtype": torch.bfloat16 if cfg.bf16 and (cfg.lora_r or frozen) else torch.float32,
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.load_in_8bit:
        from transformers import BitsAndBytesConfig

        kw.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": device})
    tok = load_tokenizer(base, cfg)[0]
    if score_head:  # the new head's random init: same seed, same run
        torch.manual_seed(cfg.seed)
        kw["num_labels"] = 1
    try:
        model = (AutoModelForSequenceClassification if score_head else AutoModelForCausalLM).from_pretrained(base, **kw)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--model {base!r}: cannot load a causal LM (is it one?): {str(e).splitlines()[0]}")
    if score_head:  # a batch is right-padded and the head reads the last token that is not padding
        model.config.pad_token_id = pad_id(tok)
    if not cfg.load_in_8bit:
        model.to(device)
    if cfg.lora_r:
        from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

        if cfg.load_in_8bit:  # fp32 norms and input grads so adapters train stably on an int8 base
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        if checkpoint:
            model = PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
        else:
            torch.manual_seed(cfg.seed)  # the adapters' random init: same seed, same run
            targets = cfg.lora_target_modules
            model = get_peft_model(
                model,
                LoraConfig(
                    r=cfg.lora_r,
                    lora_alpha=cfg.lora_alpha,
                    lora_dropout=cfg.lora_dropout,
                    task_type="SEQ_CLS" if score_head else "CAUSAL_LM",  # SEQ_CLS: the head trains in full
                    target_modules=targets if targets == "all-linear" else targets.split(","),
                ),
            )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = True  # generation still uses the KV cache; training passes use_cache=False
    if shard and not cfg.lora_r:
        # full fine-tuning under torchrun: FSDP2 shards weights, grads and AdamW states (a 7B model with fp32
        # AdamW needs ≈112 GB, ≈14 GB per rank on 8); one shard group per decoder layer, plus the rest at the root
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # the run's device: FSDP2's default mesh takes the machine's accelerator, a GPU even under --device cpu
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cfg.bf16 else None, reduce_dtype=torch.float32)
        for layer in [m for m in model.modules() if type(m).__name__ in (model._no_split_modules or [])]:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    return model.eval(), tok


def dequantized_copy(model):
    """--gen_dequantized: a plain copy of an 8-bit LoRA policy for sampling, every int8 weight dequantized and the
    active adapters merged in; bf16 on a GPU, fp32 on a CPU. The same function as the 8-bit model up to LLM.int8's
    outlier handling; ≈2 bytes per parameter, freed by the caller after sampling."""
    from peft.utils.integrations import dequantize_bnb_weight

    base = model.get_base_model()
    device = next(model.parameters()).device
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):  # a plain model: from_config must not quantize again
        del config.quantization_config
    with torch.device(device):
        plain = AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32
        )

    def weight(mod, leaf):
        p = getattr(mod, leaf)
        return dequantize_bnb_weight(p, state=mod.state) if type(p).__name__ == "Int8Params" else p.detach()

    with torch.no_grad():
        for key, p in plain.state_dict().items():
            path, _, leaf = key.rpartition(".")
            mod = base.get_submodule(path)
            if hasattr(mod, "base_layer") and hasattr(mod, "get_delta_weight"):  # a peft LoRA layer: W + B·A·scale
                w = weight(mod.base_layer, leaf)
                if leaf == "weight":
                    w = w.float() + sum(mod.get_delta_weight(a).float() for a in mod.active_adapters)
            else:
                w = weight(mod, leaf)
            p.copy_(w)
    return plain.eval()


def fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_weights(model):
    """Inference on an FSDP2 model: gather every shard group once, keep it gathered through all forward passes (no
    all-gather per decoding step, and no collective at all, so ranks may generate different numbers of steps),
    then free it. A no-op for a model that is not sharded."""
    mods = fsdp_modules(model)
    for m in mods:
        m.unshard()
        m.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in mods:
            m.set_reshard_after_forward(True)
            m.reshard()


def release(model):
    """Reshard every FSDP2 group, so no rank leaves a gathered model behind when the process group goes."""
    for m in fsdp_modules(model):
        m.reshard()


def full_state_dict(model):
    """The full state dict of an FSDP2 model, on rank 0's CPU (a collective: every rank calls it); None otherwise."""
    if not fsdp_modules(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_merged(cfg, adapter_dir: str, out: str):
    """--merge_lora: the base (reloaded in full precision, also after 8-bit training) with the adapters merged in."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(
        cfg.model, dtype=torch.bfloat16 if cfg.bf16 else torch.float32, trust_remote_code=cfg.trust_remote_code
    )
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    save_model_dir(out, merged, AutoTokenizer.from_pretrained(adapter_dir))
    print0(f"merged LoRA model: {out}")


# ---- log-probabilities of (prompt, response) rows: the KL term, the SFT loss, perplexity --------------------------
def amp(model, bf16: bool):
    """bf16 autocast for --bf16 (weights may stay fp32: mixed precision), a no-op otherwise."""
    return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=bf16)


def pad_id(tok) -> int:
    # many causal LMs have no pad token; padding positions are never attended to or trained, so EOS serves
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def build_example(prompt_ids: list[int], response_ids: list[int], end_id: Optional[int]):
    """(input_ids, labels) of one SFT row: prompt tokens carry no loss (-100); the end token only if it ended."""
    tail = response_ids + ([end_id] if end_id is not None else [])
    return prompt_ids + tail, [-100] * len(prompt_ids) + tail


def example(tok, prompt: str, sample: dict):
    return build_example(encode_prompt(tok, prompt), sample["ids"], sample["end_id"])


def _prompt_len(labels) -> int:
    return next((j for j, t in enumerate(labels) if t != -100), len(labels))


def _units(examples, idx, shared: bool) -> list[list[int]]:
    """idx grouped into units: with shared, the examples with the same prompt (the K samples of one prompt), which
    hold it once; else one example each."""
    units = {}
    for i in idx:
        x, y = examples[i]
        p = _prompt_len(y)
        units.setdefault(tuple(x[:p]) if shared and p > 1 else i, []).append(i)
    return list(units.values())


def _shared_len(examples, unit) -> int:
    """Tokens a unit holds once: its prompt but the last token, which predicts each response's first token."""
    return _prompt_len(examples[unit[0]][1]) - 1 if len(unit) > 1 else 0


def _unit_len(examples, unit) -> int:
    s = _shared_len(examples, unit)
    return s + sum(len(examples[i][0]) - s for i in unit)


def pack(examples, packed=True, shared=False) -> tuple[list[list[int]], int]:
    """Rows of example indices, first-fit decreasing into rows as long as the longest unit (an example, or with
    shared the examples of one prompt, adjacent in their row): never more rows than right padding would use, and
    short units fill the gaps. packed=False: one example per row."""
    units = sorted(_units(examples, range(len(examples)), shared), key=lambda u: -_unit_len(examples, u))
    C = _unit_len(examples, units[0])
    if not packed:
        return [[i] for u in units for i in u], C
    rows, room = [], []
    for u in units:
        n = _unit_len(examples, u)
        r = next((r for r in range(len(rows)) if room[r] >= n), None)
        if r is None:
            rows.append([])
            room.append(C)
            r = len(rows) - 1
        rows[r] += u
        room[r] -= n
    return rows, C


def _tokens(model, examples, bf16: bool, packed: bool, entropy=0.0, temperature=1.0, shared=False):
    """log p(label) at every labelled position [n], the example each belongs to [n] (in order within an example),
    and with entropy=T' > 0 the entropy of softmax(logits / T') there [n] (no gradient); p is softmax(logits / T).
    shared: the examples of one prompt hold it once, and a 4-D mask lets each response see only the prompt and its
    own tokens, at the positions it has alone: the same numbers for less work (else restarted positions mask)."""
    rows, C = pack(examples, packed, shared)
    ids = torch.zeros((len(rows), C), dtype=torch.long)  # padding is a segment of its own after every unit
    pos = torch.arange(C).repeat(len(rows), 1)
    tgt = torch.full((len(rows), C), -100, dtype=torch.long)
    seg = torch.zeros((len(rows), C), dtype=torch.long)
    unit = torch.full((len(rows), C), -1, dtype=torch.long)  # shared: each token's unit (padding: -1) and example
    member = torch.zeros((len(rows), C), dtype=torch.long)  # in the unit (-1: the shared prompt)
    for r, row in enumerate(rows):
        off = 0
        for u, members in enumerate(_units(examples, row, shared)):
            s = _shared_len(examples, members)
            ids[r, off : off + s], pos[r, off : off + s] = torch.tensor(examples[members[0]][0][:s]), torch.arange(s)
            unit[r, off : off + s], member[r, off : off + s] = u, -1
            off += s
            for k, i in enumerate(members):
                x, y = examples[i]
                n = len(x) - s
                ids[r, off : off + n], seg[r, off : off + n] = torch.tensor(x[s:]), i
                pos[r, off : off + n] = torch.arange(s, len(x))  # restarted: transformers masks across examples
                tgt[r, off : off + n - 1] = torch.tensor(y[s + 1 :], dtype=torch.long)  # j predicts token j + 1
                unit[r, off : off + n], member[r, off : off + n] = u, k
                off += n
        pos[r, off:] = torch.arange(C - off)
    keep = (tgt.flatten() != -100).nonzero().flatten()  # [n]: the positions that carry a loss
    device = next(model.parameters()).device
    keep_d = keep.to(device)
    mask = None
    if shared:  # a token sees the earlier tokens of its unit that are the shared prompt or its own example's
        mask = (unit[:, :, None] == unit[:, None, :]) & torch.ones(C, C, dtype=torch.bool).tril()
        mask = (mask & ((member[:, None, :] == -1) | (member[:, :, None] == member[:, None, :])))[:, None]
        if getattr(model, "module", model).config._attn_implementation == "eager":  # it adds the mask to scores
            mask = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
        mask = mask.to(device)
    # the LM head sees only the labelled positions: prompts need no logits, a large saving with 128K vocabularies
    head = getattr(model, "module", model).get_output_embeddings()  # under DDP: the wrapped model's
    hook = head.register_forward_pre_hook(lambda m, args: (args[0].flatten(0, 1)[keep_d][None],))
    try:
        with amp(model, bf16):
            out = model(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask, use_cache=False)
            logits = out.logits[0].float()
    finally:
        hook.remove()
    if temperature != 1.0:  # the distribution a sampler at temperature T draws from
        logits = logits / temperature
    lp = -torch.nn.functional.cross_entropy(logits, tgt.flatten()[keep].to(device), reduction="none")  # [n]
    ent = None
    if entropy:  # a measurement, never trained: no graph through the [n, vocab] softmax
        with torch.no_grad():
            logp = (logits if entropy == temperature else logits * (temperature / entropy)).log_softmax(-1)
            ent = -(logp.exp() * logp).sum(-1)
    return lp, seg.flatten()[keep].to(device), ent


def _logprobs(model, examples, bf16: bool, packed: bool, shared=False):
    lp, seg, _ = _tokens(model, examples, bf16, packed, shared=shared)
    total = torch.zeros(len(examples), device=lp.device, dtype=lp.dtype).index_add(0, seg, lp)
    return total, torch.bincount(seg, minlength=len(examples))


def _exact(model, name: str, examples, bf16, failed: str, **layout) -> bool:
    """Whether this model's log-probs in a layout equal one example per row (asked once per model, then remembered
    as the attribute `name`); failed is said once where not."""
    base = getattr(model, "module", model)
    if not hasattr(base, name):
        was_training = base.training
        base.eval()  # dropout off, or the two passes would differ by chance
        with torch.no_grad():
            b, _ = _logprobs(model, examples, bf16, packed=False)
            try:
                a, _ = _logprobs(model, examples, bf16, **layout)
            except (ValueError, RuntimeError) as e:  # a model that cannot take the layout's mask (BLOOM's ALiBi)
                a, failed = b + 1, f"{failed} ({str(e).splitlines()[0][:100]})"
        base.train(was_training)
        # fp32 agrees to ~1e-6 where packing is exact; a leak measured on tiny OPT/BLOOM models was 2e-3 and more
        tol = 1e-4 if next(base.parameters()).dtype == torch.float32 and not bf16 else 5e-2
        setattr(base, name, bool(((a - b).abs() <= tol).all()))
        if not getattr(base, name):
            print0(f"{type(base).__name__}: {failed}")
    return getattr(base, name)


def packing_is_exact(model, examples, bf16=False) -> bool:
    few = sorted(examples, key=lambda e: len(e[0]))[:6]  # the shortest: several share a row
    return _exact(model, "_raft_packing_exact", few, bf16, "packed rows leak across examples; SFT uses one example "
                  "per row", packed=True)  # fmt: skip


def deal(examples, idx: list[int], world: int) -> list[list[int]]:
    """idx dealt to world ranks by prompt, largest first to the rank with the fewest tokens, so that a prompt's
    samples stay together (and share its tokens) and ranks get similar work: each rank's indices, in order."""
    ranks, load = [[] for _ in range(world)], [0] * world
    for u in sorted(_units(examples, idx, True), key=lambda u: -_unit_len(examples, u)):
        r = load.index(min(load))
        ranks[r] += u
        load[r] += _unit_len(examples, u)
    return ranks


def _layout(model, examples, bf16) -> dict:
    """Packed rows where this model's packing is exact, and a prompt shared by its samples where two examples have
    one, the model's attention takes a 4-D mask (sdpa, eager) and sharing is exact too (each checked once)."""
    if len(examples) < 2 or not packing_is_exact(model, examples, bf16):
        return dict(packed=False)
    twins = next((u for u in _units(examples, range(len(examples)), True) if len(u) > 1), None)
    if twins is None or getattr(model, "module", model).config._attn_implementation not in ("sdpa", "eager"):
        return dict(packed=True)
    ok = _exact(model, "_raft_sharing_exact", [examples[i] for i in twins[:2]], bf16, "a shared prompt changes the "
                "log-probs; each sample keeps its own copy", packed=True, shared=True)  # fmt: skip
    return dict(packed=True, shared=ok)


def example_logprobs(model, examples, bf16=False):
    """Sum of log p(label) over each example's labelled positions, and their count: ([B], [B])."""
    return _logprobs(model, examples, bf16, **_layout(model, examples, bf16))


def token_logprobs(model, examples, bf16=False, entropy=0.0, temperature=1.0):
    """log p(label) per labelled position [n] and the example of each [n] (and the entropy at temperature `entropy`
    there [n])."""
    return _tokens(model, examples, bf16, entropy=entropy, temperature=temperature, **_layout(model, examples, bf16))


@torch.no_grad()
def policy_pass(model, examples, batch_size: int, bf16=False, temperature=1.0, reference=None, spread=True):
    """The sampling policy on examples before a stage's first update, by the same packed forward as training (not
    the sampler's numbers, which differ by kernel), dropout off, at the sampling temperature: per example its
    per-token log-probs (π_old of --loss is and clip), summed per-token entropy, token count and, with `reference`
    (make_kl's: runs a function on the stage-0 model), summed low-variance KL estimate exp(q) - q - 1, q = log p_0 -
    log p_θ per token (verl's low_var_kl, clamped at 10 as there). Each rank computes every WORLD-th example and the
    results are gathered, so every rank holds all of them."""
    rank, world = (RANK, WORLD) if spread else (0, 1)
    mine = list(range(len(examples)))[rank::world]
    model.eval()
    out = []
    with full_weights(model):  # no collectives: ranks may hold different numbers of batches
        for s in range(0, len(mine), batch_size):
            part = [examples[i] for i in mine[s : s + batch_size]]
            lp, seg, ent = token_logprobs(model, part, bf16, entropy=temperature, temperature=temperature)
            kl = torch.zeros_like(lp)
            if reference is not None:
                ref = reference(lambda m, part=part: token_logprobs(m, part, bf16, temperature=temperature)[0])
                q = ref.to(lp.device) - lp
                kl = (q.exp() - q - 1).clamp(max=10)
            order = torch.argsort(seg, stable=True)  # packed order -> example-major order
            for j, (a, e, k) in enumerate(zip(*(x[order].split(torch.bincount(seg, minlength=len(part)).tolist())
                                                for x in (lp, ent, kl)))):  # fmt: skip
                out.append((mine[s + j], a.cpu(), e.sum().item(), len(a), k.sum().item()))
    got = sorted(gather(out) if spread else out, key=lambda r: r[0])
    return [r[1] for r in got], [r[2:] for r in got]


@torch.no_grad()
def sequence_logprobs(model, examples, batch_size: int, bf16=False) -> list[float]:
    """log p(response (+end) | prompt) per example: the KL term of the ranking score, and perplexity."""
    model.eval()
    out = []
    with full_weights(model):  # ranks score different numbers of batches: no collectives inside
        for s in range(0, len(examples), batch_size):
            out += example_logprobs(model, examples[s : s + batch_size], bf16)[0].tolist()
    return out


# ---- the variants of the loop: who samples, where each stage starts, the KL reference ----------------------
def retokenize(samples, tok):
    for s in (s for row in samples for s in row):
        s["ids"] = tok(s["text"], add_special_tokens=False)["input_ids"]
        s["end_id"] = None if s["end_id"] is None else tok.eos_token_id


def example_major(seg: torch.Tensor) -> torch.Tensor:
    """Where each example-major token (examples in order, tokens in order) stands in the packed order seg gives."""
    return torch.argsort(torch.argsort(seg, stable=True), stable=True)


def load_generator(cfg, model, tok, device):
    """The model that samples: the policy, or a frozen --generator_model with its own tokenizer (paper Table 8)."""
    if not cfg.generator_model:
        return model, tok
    frozen = dict(model=cfg.generator_model, lora_r=0, load_in_8bit=False, gradient_checkpointing=False)
    return load_policy(dataclasses.replace(cfg, **frozen), device, frozen=True)


def make_kl(cfg, model, device):
    """With --kl_beta > 0 or --eval_kl: f(examples) -> (log p_θ, log p_0) per example, p_0 the stage-0 model, and
    f.reference(fn), which runs fn on p_0; else None. Under LoRA p_0 is the base with the adapters switched off (no
    second copy)."""
    if cfg.kl_beta == 0 and not cfg.eval_kl:
        return None
    lp = lambda m, ex: sequence_logprobs(m, ex, cfg.micro_batch_size, cfg.bf16)
    if cfg.lora_r:

        def reference(fn):
            with model.disable_adapter():
                return fn(model)

    else:
        # the same precision path as the policy (fp32 weights, bf16 autocast under --bf16): stage 0 measures exactly 0
        ref = load_policy(dataclasses.replace(cfg, gradient_checkpointing=False), device)[0].requires_grad_(False)
        reference = lambda fn: fn(ref)
    kl = lambda ex: (lp(model, ex), reference(lambda m: lp(m, ex)))
    kl.reference = reference
    return kl


def restore(model, initial: dict):
    """--finetune_from base: put back the stage-0 values of what trains before each stage's fine-tuning."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if initial and n in initial:
                p.copy_(initial[n])


def dropout_off(model):
    """Dropout modules to eval mode in a training model (LoRA's dropout, for one): --loss is and clip weigh tokens by
    π_θ/π_old, and π_old was computed without dropout, so the ratio starts at exactly 1."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()


def dropout_free(model, cfg) -> bool:
    """Whether the training forward draws no dropout (--loss is and clip switch the modules off): then it computes
    what a separate pass over the same weights would, and can measure the policy itself."""
    on = cfg.loss == "sft" and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    return not on and not getattr(getattr(model, "config", None), "attention_dropout", 0)


def make_optimizer(model, cfg):
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach on the CPU too (CUDA's default): the same arithmetic, bit for bit, ≈10% faster steps on the demos
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def optimizer_state(model, opt):
    """--regime rl: the AdamW state to save with a stage (FSDP2: gathered in full to rank 0's CPU; a collective)."""
    if not fsdp_modules(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer(model, opt, path: str):
    """--resume in --regime rl: the AdamW state saved with the stage resumed from (FSDP2: each rank its shards)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not fsdp_modules(model):
        return opt.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


def trainable_state(model) -> dict:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
