"""Fast sampling for RAFT's step 1, K responses per prompt, from any transformers causal LM whose attention runs
through AttentionInterface (LoRA and 8-bit too). It beats `model.generate` on this workload by prefilling each
prompt once for all K samples, decoding into a preallocated per-row cache, replaying each decode step as one CUDA
graph on a GPU, and sampling inside the step with no host sync. It plugs in as the attention function "raft_kv", so
the rest of the forward stays the model's own code; greedy decoding gives `model.generate`'s tokens. Left out:
sliding windows shorter than the sequence, soft-capping and attention sinks (such a model raises `Unsupported` at
the first prefill, before any sampling, and sampling.py falls back to `model.generate`), and early stops at stop
strings. Why and how, and what is tested: docs/speed.md.
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTN = "raft_kv"  # not a mask-interface name either, so transformers builds no mask for it: we mask ourselves


class Unsupported(Exception):
    """The model's attention needs an option the fast path does not implement; use model.generate instead."""


class Shared:
    """The state of one sample() call, handed to the attention as one opaque object: FSDP2 with a bf16 param_dtype
    casts a forward's inputs by rebuilding every dict and list in them, so a plain dict would reach the attention
    as a copy and the cache it writes would be lost."""

    __slots__ = ("st",)

    def __init__(self, st: dict):
        self.st = st


def _attention(module, q, k, v, mask, dropout=0.0, scaling=None, raft_kv=None, **kw):
    """Attention for one layer. Prefill: q [B, H, Lp, D], k/v [B, Hkv, Lp, D] are stored as the prompts' prefix.
    Decode: q [N, H, 1, D], k/v [N, Hkv, 1, D] of step t go to suffix slot t. Returns [rows, q_len, H, D]."""
    st = raft_kv.st if isinstance(raft_kv, Shared) else None
    if st is None:
        raise Unsupported("the raft_kv attention was called outside fastgen.sample")
    window = kw.get("sliding_window")
    if kw.get("softcap") is not None or kw.get("s_aux") is not None or (window and window < st["total_len"]):
        raise Unsupported(f"{type(module).__name__} uses soft-capping, attention sinks or a sliding window")
    i = module.layer_idx
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    if st["mode"] == "prefill":
        pk, pv = st["pk"][i], st["pv"][i]
        dtype = st["kv_dtype"] or k.dtype  # --bf16 on fp32 weights: a bf16 cache, as the steps compute in bf16
        if pk is None or pk.shape != k.shape or pk.dtype != dtype:
            pk, pv = st["pk"][i], st["pv"][i] = k.new_empty(k.shape, dtype=dtype), v.new_empty(v.shape, dtype=dtype)
        pk.copy_(k)
        pv.copy_(v)
        out = F.scaled_dot_product_attention(
            q, pk, pv, attn_mask=st["prefill_mask"], scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
        return out.transpose(1, 2).contiguous(), None
    pk, pv, sk, sv, t = st["pk"][i], st["pv"][i], st["sk"][i], st["sv"][i], st["t"]
    sk.index_copy_(2, t, k.to(sk.dtype))  # under autocast RoPE may return fp32 (fp32 cos/sin) or bf16
    sv.index_copy_(2, t, v.to(sv.dtype))
    B, Hkv, Lp, D = pk.shape
    N, H = q.shape[:2]
    Kn, g, S = N // B, H // Hkv, sk.shape[2]
    # prefix: the K samples of a prompt become extra query rows of that prompt, [B, Hkv, K·g, D] @ [B, Hkv, D, Lp]
    qp = q.view(B, Kn, Hkv, g, D).permute(0, 2, 1, 3, 4).reshape(B, Hkv, Kn * g, D)
    s1 = torch.matmul(qp, pk.transpose(-1, -2)).float().mul_(scale)
    s1 = s1.masked_fill_(~st["prefix_valid"][:, None, None, :], -math.inf)
    s1 = s1.view(B, Hkv, Kn, g, Lp).permute(0, 2, 1, 3, 4).reshape(N, Hkv, g, Lp)
    # own suffix: [N, Hkv, g, D] @ [N, Hkv, D, S], slots after t masked
    s2 = torch.matmul(q.view(N, Hkv, g, D), sk.transpose(-1, -2)).float().mul_(scale)
    s2 = s2.masked_fill_(st["slots"] > t, -math.inf)
    p = torch.cat([s1, s2], -1).softmax(-1).to(v.dtype)  # one softmax over [prefix ‖ suffix]: [N, Hkv, g, Lp + S]
    p1, p2 = p.split([Lp, S], -1)
    p1 = p1.reshape(B, Kn, Hkv, g, Lp).permute(0, 2, 1, 3, 4).reshape(B, Hkv, Kn * g, Lp)
    o1 = torch.matmul(p1, pv).view(B, Hkv, Kn, g, D).permute(0, 2, 1, 3, 4).reshape(N, H, D)
    o2 = torch.matmul(p2, sv).reshape(N, H, D)
    return (o1 + o2).unsqueeze(1), None


AttentionInterface.register(ATTN, _attention)


def pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Next token per row from fp32 logits [N, V]: HF's order (temperature, top_k, top_p), then an exact categorical
    draw by the exponential race (no torch.multinomial, no host sync: CUDA-graph safe). temperature 0: argmax."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(top_k).values[:, -1:], -math.inf)
    if top_p < 1:  # drop the least likely tokens whose total mass is ≤ 1 - top_p, always keeping the most likely
        sorted_logits, order = logits.sort(-1)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    probs = logits.softmax(-1)
    return probs.div_(torch.empty_like(probs).exponential_().clamp_(min=1e-20)).argmax(-1)


def _base(model):
    """The transformers model under peft / DDP wrappers: it owns the config whose attention we switch."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model


@contextlib.contextmanager
def _raft_attention(model):
    cfg = _base(model).config
    old = cfg._attn_implementation
    cfg._attn_implementation = ATTN
    try:
        yield
    finally:
        cfg._attn_implementation = old


def _graphs_possible(model, device) -> bool:
    """CUDA graphs need a CUDA model with no host work inside its forward: not bitsandbytes 8-bit (it decides
    outliers on the host) and not an FSDP-sharded model (hooks run per forward)."""
    if device.type != "cuda" or getattr(_base(model), "is_loaded_in_8bit", False):
        return False
    from torch.distributed.fsdp import FSDPModule

    return not any(isinstance(m, FSDPModule) for m in model.modules())


@torch.no_grad()
def sample(
    model,
    prompts: list[list[int]],
    K: int,
    *,
    max_new_tokens: int,
    eos_ids,
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_prompts: int = 64,
    cuda_graphs: bool = True,
    autocast_dtype=None,
    bucket: int = 32,
    static_shapes=None,
    progress=None,
) -> list[list[list[int]]]:
    """K continuations of each prompt (token ids; BOS etc. already in them) -> [len(prompts)][K] lists of new
    token ids: up to and including the first EOS, else max_new_tokens long. Prompts are processed shortest first,
    batch_prompts at a time (B·K rows per step). eos_ids: ids that end a sample (empty: never stop early).
    autocast_dtype: compute dtype for fp32 weights (--bf16). static_shapes (default: when CUDA graphs are used):
    prompt lengths rounded up to `bucket` and the last batch padded, so batches share shapes (and captures).
    progress: wraps the iterable of batches (a bar)."""
    model.eval()
    device = next(model.parameters()).device
    graphs = cuda_graphs and _graphs_possible(model, device)
    static = graphs if static_shapes is None else static_shapes
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    chunks = [order[s : s + batch_prompts] for s in range(0, len(order), batch_prompts)]
    out = [None] * len(prompts)
    eos = torch.tensor(sorted(set(eos_ids)) or [-1], device=device)
    S = max_new_tokens
    # --bf16 on fp32 weights (full fine-tuning's master copy): autocast's cache keeps one bf16 copy of each weight
    # for the whole phase (+2 bytes per parameter), so a decode step reads bf16 weights instead of re-casting fp32
    # ones (3× the bytes). The prefill fills the cache before any capture, so a captured step reads the cached
    # copies; they live until this context exits, after the last replay (weights do not change while sampling).
    amp = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None, cache_enabled=True)
    n_layers = _base(model).config.num_hidden_layers
    st = {
        "pk": [None] * n_layers,
        "pv": [None] * n_layers,
        "sk": [None] * n_layers,
        "sv": [None] * n_layers,
        "kv_dtype": autocast_dtype,
    }
    graph, graph_key, shared = None, None, Shared(st)
    with _raft_attention(model), amp:
        for idx in progress(chunks) if progress else chunks:
            # graphs: pad a short last batch to the others' size, so that one capture serves them all
            B = min(batch_prompts, len(order)) if static else len(idx)
            rows = [prompts[i] for i in idx] + [prompts[idx[0]]] * (B - len(idx))
            longest = max(len(r) for r in rows)
            Lp = -(-longest // bucket) * bucket if static else longest
            N = B * K
            ids, valid = (x.to(device) for x in left_pad(rows, Lp, pad_id))
            pos = (valid.long().cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only, as generate's
            causal = torch.ones(Lp, Lp, dtype=torch.bool, device=device).tril()
            # a padded query attends to itself only, so no row is all -inf (NaN would leak through 0·NaN)
            st.update(
                mode="prefill",
                total_len=Lp + S,
                prefill_mask=(causal & valid[:, None, :] | torch.eye(Lp, dtype=torch.bool, device=device))[:, None],
            )
            _keep(st, "prefix_valid", valid)
            logits = model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1, raft_kv=shared).logits
            first = pick(logits[:, -1].float().repeat_interleave(K, 0), temperature, top_k, top_p)  # [N]
            if st["sk"][0] is None or st["sk"][0].shape[0] != N:  # the suffix cache: [N, Hkv, S, D] per layer
                st["sk"] = [torch.zeros(N, k.shape[1], S, k.shape[3], dtype=k.dtype, device=device) for k in st["pk"]]
                st["sv"] = [torch.zeros_like(x) for x in st["sk"]]
                st.update(
                    t=torch.zeros(1, dtype=torch.long, device=device),
                    slots=torch.arange(S, device=device),
                    cur=torch.zeros(N, dtype=torch.long, device=device),
                    tokens=torch.full((N, S), pad_id, dtype=torch.long, device=device),
                    done=torch.zeros(N, dtype=torch.bool, device=device),
                )
            st["mode"] = "decode"
            _keep(st, "base_pos", pos[:, -1:].repeat_interleave(K, 0) + 1)  # [N, 1]: the first new token's position

            def step():
                """Feed cur at slot t; sample the next token into tokens[:, t + 1]; rows past EOS emit padding."""
                lg = (
                    model(
                        input_ids=st["cur"][:, None],
                        position_ids=st["base_pos"] + st["t"],
                        use_cache=False,
                        logits_to_keep=1,
                        raft_kv=shared,
                    )
                    .logits[:, -1]
                    .float()
                )
                nxt = pick(lg, temperature, top_k, top_p).masked_fill_(st["done"], pad_id)
                st["tokens"].index_copy_(1, st["t"] + 1, nxt[:, None])
                st["done"] |= (nxt[:, None] == eos).any(1)
                st["cur"].copy_(nxt)
                st["t"].add_(1)

            def reset(first=first):  # bound now: the graph replays this iteration's tensors
                st["t"].zero_()
                st["cur"].copy_(first)
                st["tokens"].fill_(pad_id)
                st["tokens"][:, 0] = first
                st["done"].copy_((first[:, None] == eos).any(1))

            if graphs and graph_key != (N, Lp):
                graph = None  # free the last bucket's graph before capturing the next
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graph's docs ask
                    reset()
                    step()
                torch.cuda.current_stream().wait_stream(side)
                graph, graph_key, stream = torch.cuda.CUDAGraph(), (N, Lp), torch.cuda.current_stream()
                try:
                    with torch.cuda.graph(graph):
                        step()
                except RuntimeError as e:  # host work inside this model's forward: decode eagerly instead
                    # a failed capture makes capture_end raise before torch.cuda.graph restores the stream it made
                    # current: put ours back, or all later work of this process would run on the capture stream
                    torch.cuda.set_stream(stream)
                    print(
                        f"fastgen: CUDA-graph capture failed ({str(e).splitlines()[0][:200]}); decoding without "
                        f"graphs (--cuda_graphs false skips the attempt)",
                        flush=True,
                    )
                    graphs, graph = False, None
                    torch.cuda.synchronize()
            reset()
            for t in range(S - 1):
                graph.replay() if graphs else step()
                if t % 8 == 7 and bool(st["done"].all()):  # a host sync every 8 steps, to stop when all ended
                    break
            toks = st["tokens"].tolist()
            for r, i in enumerate(idx):
                out[i] = [_until_eos(toks[r * K + k], eos_ids) for k in range(K)]
    return out


def left_pad(rows: list[list[int]], L: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded to L columns, so every prompt ends at column L and new tokens start there:
    (ids [B, L], valid [B, L] bool)."""
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    valid = torch.zeros((len(rows), L), dtype=torch.bool)
    for r, p in enumerate(rows):
        if p:
            ids[r, L - len(p) :] = torch.tensor(p)
            valid[r, L - len(p) :] = True
    return ids, valid


def _keep(st: dict, name: str, value: torch.Tensor):
    """st[name] = value, copied into the tensor already there when shapes match: a captured graph reads that one."""
    old = st.get(name)
    if old is not None and old.shape == value.shape and old.dtype == value.dtype:
        old.copy_(value)
    else:
        st[name] = value.clone()


def _until_eos(ids: list[int], eos_ids) -> list[int]:
    for n, t in enumerate(ids):
        if t in eos_ids:
            return ids[: n + 1]
    return ids
