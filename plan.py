"""Rehearse one RAFT stage on the GPUs it is meant for, without a GPU: memory per phase and rank, a verdict, a time.

    python plan.py --model M --reward RM --K 8 --bf16 --nproc_per_node 8 --gpu A40   # raft.py's options, plus these

plan.py takes raft.py's own options (the same Config) and runs raft.py's own code for each phase of one stage at its
worst-case shapes (every prompt --max_prompt_tokens long, every response --max_new_tokens) on fake tensors, under
torch's memory trackers (FSDPMemTracker for an FSDP2 policy, MemTracker otherwise), on a fake process group of the
run's world size. Only the models' configs load (a path or a hub id): the weights are fake, the memory modes are
load_policy's own (fp32 / bf16 autocast full fine-tuning, LoRA, FSDP2 under torchrun). Per phase it prints the peak
and its parts, an allowance for what no tracker sees (each number with its source), a verdict against
--gpu_memory_gb and, when a phase does not fit, the first change that does, found by planning again. FLOPs (counted
in the same run) and the bytes of a decoding step give an estimated stage time on --gpu. docs/planning.md explains
how, what was checked against real tensors, and the 7B numbers.

What it does not run: bitsandbytes' own int8 loader (it needs a GPU): --load_in_8bit plans the model with stand-in
int8 projections of the same bytes that call bitsandbytes' own GPU matmul (MatMul8bitLt) on fake tensors; DDP's
gradient buckets (counted from the trainable parameters); --gen_dequantized's copy and the vLLM engine (counted
by their own rules). Imports the kit's modules; nothing imports it. Exit status 3 when a phase does not fit.
"""

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Optional
from unittest import mock

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, HfArgumentParser

import fastgen
import models
import raft
import reward
import sampling

GB = 1e9
# name: (memory GB as sold, bf16 dense TFLOP/s, memory GB/s, GB/s one way between GPUs) from NVIDIA's datasheets
GPUS = {
    "A40": (48, 149.7, 696, 32),  # PCIe 4.0 x16 between GPUs (the NVLink bridge joins pairs only)
    "A100-80GB": (80, 312, 2039, 300),  # SXM, NVLink 3
    "H100": (80, 989, 3350, 450),  # SXM, NVLink 4
    "H200": (141, 989, 4800, 450),
}
# What no tracker sees, per rank (GB, and where the number comes from)
CONTEXT_GB = (0.5, "0.3-0.5 GB on recent GPUs with lazy module loading (the default since CUDA 12.2)")
CUBLAS_GB = (0.1, "torch gives each cuBLAS handle and stream 4096 KiB x 8, and cuBLASLt 4 MiB (Ampere) or 32 MiB "
             "(Hopper); a few streams")  # fmt: skip
NCCL_GB = (1.0, "under torchrun: NCCL's 4 MiB buffers (NCCL_BUFFSIZE) per channel, peer and protocol; an allowance")
FRAG = (0.10, "the caching allocator's reserved - allocated: 10% of the peak, an allowance "
        "(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True lowers it)")  # fmt: skip
MARGIN = 0.05  # less to spare than this share of the GPU is reported as no margin (still a fit)
LAUNCH_S = 5e-6  # seconds per kernel launch of an eager decoding step (no CUDA graph), an assumption
aten = torch.ops.aten


@dataclass
class PlanArgs:
    nproc_per_node: int = field(default=1, metadata={"help": "processes (GPUs) per node, as torchrun's"})
    nnodes: int = field(default=1, metadata={"help": "nodes, as torchrun's"})
    torchrun: bool = field(default=False, metadata={"help": "launched by torchrun (implied when there are >1 GPUs)"})
    gpu: str = field(default="A40", metadata={"help": f"the GPU of the time estimate: {', '.join(GPUS)}"})
    gpu_memory_gb: Optional[float] = field(default=None, metadata={"help": "memory per GPU in GB (default: --gpu's)"})
    mfu: float = field(default=0.4, metadata={"help": "share of the bf16 peak that prefill, scoring, training reach"})
    mbu: float = field(default=0.6, metadata={"help": "share of memory and link bandwidth a decoding step reaches"})
    depths: str = field(default="3,4", metadata={"help": "decoder layers planned, extrapolated (full: every layer)"})
    find_fix: bool = field(default=True, metadata={"help": "when a phase does not fit, plan again to find a fix"})


# ---- fake tensors: configs only, no weights -----------------------------------------------------------------------
class _Stop(Exception):
    """Raised after the second decoding step: fastgen preallocates its cache, so later steps repeat the second."""


class _Fake:
    """The fake machine: a fake process group of the run's world size, a FakeTensorMode (with a shape env, so that
    .item() of a fake tensor gives a symbol instead of failing) and a fake seed tensor that new tensors come from."""

    def __init__(self, world: int):
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        logging.getLogger("torch.__trace").propagate = False  # a debug record per fake .item(), for torch's tracing
        self.world, self.own_pg = world, not torch.distributed.is_initialized()
        if self.own_pg:
            from torch.testing._internal.distributed.fake_pg import FakeStore

            torch.distributed.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))  # outside the fake mode
        self.mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(allow_scalar_outputs=True))
        with self.mode:
            self.seed = torch.empty(0)
        self.built = {}  # the models of each (family run, layers, reward model resident), reused across phases

    def close(self):
        if self.own_pg:
            torch.distributed.destroy_process_group()

    def empty(self, like, dtype=None):
        return self.seed.new_empty_strided(like.shape, like.stride(), dtype=dtype or like.dtype)

    def materialize(self, model):
        """A model built on the meta device, made fake on "cpu" without a copy of anything. FSDP2's to_empty
        swaps its DTensors; plain parameters are replaced in place (a fake tensor cannot be swapped)."""
        if models.fsdp_modules(model):
            with self.mode:
                model.to_empty(device="cpu")
            return model
        memo = {}
        for mod in model.modules():
            for kind in ("_parameters", "_buffers"):
                for name, t in list(getattr(mod, kind).items()):
                    if t is not None and t.device.type == "meta":
                        if id(t) not in memo:  # tied weights stay tied
                            new = self.empty(t)
                            memo[id(t)] = torch.nn.Parameter(new, t.requires_grad) if kind == "_parameters" else new
                        getattr(mod, kind)[name] = memo[id(t)]
        return model


class _Factories(torch.utils._python_dispatch.TorchDispatchMode):
    """Tensors made from nothing (empty, zeros, full, arange, ...) in floating point become fake: the KV cache, FSDP2's
    buffers, activations. Integer and bool ones stay real: token ids, positions, masks and index lists are data the
    kit's host code reads (the packed rows, the labelled positions). Counts FLOPs (torch's flop_registry) and ops."""

    def __init__(self, fake: _Fake):
        super().__init__()
        self.fake, self.flops, self.ops = fake, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._guards import active_fake_mode
        from torch.distributed.tensor import DTensor
        from torch.utils._pytree import tree_leaves
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        if any(t is DTensor for t in types):
            return NotImplemented  # DTensor turns into local ops, which come back here
        if active_fake_mode() is not None:  # DTensor's sharding propagation in a fake mode of its own: no real op
            return func(*args, **kwargs)
        self.ops += 1
        if "device" in kwargs and not any(isinstance(a, torch.Tensor) for a in tree_leaves((args, kwargs))):
            with torch.utils._python_dispatch._disable_current_modes():
                shape = func(*args, **{**kwargs, "device": torch.device("meta")})
            if shape.dtype.is_floating_point:
                return self.fake.empty(shape)
        out = func(*args, **kwargs)
        if func.overloadpacket in flop_registry:
            self.flops += flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        elif func.namespace == "bitsandbytes" and "_mm" in func._opname:  # int8 matmuls: A [.., k] · B [n, k]
            a, b = args[1 if "mixed" in func._opname else 0], args[2 if "mixed" in func._opname else 1]
            self.flops += 2 * a.numel() * b.shape[0]
        return out


def _tracker_class(base):
    """torch's tracker (MemTracker or FSDPMemTracker) with what the plan needs on top: the peak only (no per-module
    snapshots, so the kit may run the model many times), the KV cache and the autocast weight copies as parts of
    their own, and resident models of any kind registered at the start."""
    from torch.distributed._tools.fsdp2_mem_tracker import _FSDPRefType
    from torch.distributed._tools.mem_tracker import _MemRefType

    class Tracker(base):
        in_kv, label = False, ""

        def __init__(self, *a):
            super().__init__(*a)
            self._ref_class = [*_FSDPRefType, *_MemRefType, "KV cache", "Weight copy"]
            self.peaks = {}  # region -> the snapshot at its peak

        def region(self) -> str:
            """Where the code is: the peak of each region grows with the layers at its own rate, so the plan
            extrapolates each region's peak and takes the largest (one peak could change places between depths)."""
            where = "optimizer" if self._in_opt else "backward" if self._mod_tracker.is_bw else "forward" if len(
                self._mod_tracker.parents) > 1 else "between"  # fmt: skip
            return f"{self.label} {where}".strip()

        def _update_peak_stats(self, peak_state):
            snap = self._curr_mem_snap.get(torch.device("cpu"))
            if snap is None:
                return
            r = self.region()
            if snap["Total"] > self.peaks.get(r, {}).get("Total", -1):
                self.peaks[r] = dict(snap)

        def _fsdp_state_pre_forward(self, fsdp_mod, orig):
            inner = super()._fsdp_state_pre_forward(fsdp_mod, orig)

            def outer(*args, **kwargs):  # a new forward of the root: forget the last one's module statistics
                if fsdp_mod is self._root_mod and not self._mod_tracker.is_bw:
                    self.memory_tracking.clear()
                return inner(*args, **kwargs)

            return outer

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            # torch's version hooks every parameter's gradient, and a frozen one (LoRA's base, int8) refuses hooks
            out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)

            def grad(g):
                self._update_and_maybe_create_winfos(g, _MemRefType.GRAD)

            for p in module.parameters() if install_grad_hooks else []:
                if p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                    self._param_to_grad_hook_handles[p] = (
                        p.register_hook(grad),
                        p.register_post_accumulate_grad_hook(lambda q: grad(q.grad)),
                    )
            return out

        # MemTracker's module hooks, lean: the parameters of a module are tracked when it first runs, and the flag
        # of activation checkpointing's recomputation kept (it tells activations from backward temporaries); no
        # per-module snapshots (a deep copy at every module call) and no refusal to run a model twice
        def _pre_fw_hook(self, module, inputs):
            if module not in self.memory_tracking:
                self._track_module_params_and_buffers(module, install_grad_hooks=True)
                self.memory_tracking[module] = None
            elif self._mod_tracker.is_bw and self._ac_mod is None:
                self._ac_mod, self._in_ac = weakref.ref(module), True

        def _post_fw_hook(self, module, inputs, outputs):
            if self._mod_tracker.is_bw and self._ac_mod is not None and self._ac_mod() is module:
                self._ac_mod, self._in_ac = None, False

        def _pre_bw_hook(self, module, args):
            pass

        def _post_bw_hook(self, module, args):
            pass

        def resident(self, *objs):
            from torch.distributed._tools.mem_tracker import MemTracker

            MemTracker.track_external(self, *[o for o in objs if o is not None])

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            res = super().__torch_dispatch__(func, types, args, kwargs)
            if res is NotImplemented or not args or not isinstance(args[0], torch.Tensor):
                return res
            if self.in_kv and func in (aten.copy_.default, aten.index_copy_.default):
                self._update_and_maybe_create_winfos(args[0], "KV cache")  # fastgen writes its cache in place
            elif func is torch.ops.c10d._allgather_base_.default:  # FSDP2 gathers for a forward, or full_weights
                self._update_and_maybe_create_winfos(args[0], _FSDPRefType.ALL_GATHER)
            elif func is torch.ops.fsdp.split_with_sizes_copy.default:  # ... and copies into the unsharded weights
                for t in (kwargs or {}).get("out", []):
                    self._update_and_maybe_create_winfos(t, _FSDPRefType.UNSHARDED_PARAM)
            elif func is aten._to_copy.default and isinstance(res, torch.Tensor):
                st = args[0].untyped_storage()
                src = self._WINFO.get(st, (None,))[0] if not args[0].is_meta else None
                if src is not None and src.reftype in (_MemRefType.PARAM, _FSDPRefType.SHARDED_PARAM):
                    self._update_and_maybe_create_winfos(res, "Weight copy")  # autocast's bf16 copy of a weight
            return res

    return Tracker


PARTS = {  # the printed parts, from the trackers' categories
    "weights": ("Parameter", "Sharded Param", "Buffer"),
    "gathered": ("Unsharded Param", "All Gather", "Weight copy"),
    "grads": ("Gradient", "Sharded Grad", "Unsharded Grad"),
    "optimizer": ("Optstate", "OptState"),
    "activations": ("Activation", "Inputs", "Other"),
    "KV cache": ("KV cache",),
    "temporaries": ("Temp", "Reduce Scatter"),
}


def _parts(snap: dict) -> dict:
    cpu = {str(getattr(k, "value", k)): v for k, v in snap.items()}
    out = {p: sum(cpu.get(k, 0) for k in keys) for p, keys in PARTS.items()}
    out["peak"] = cpu.get("Total", 0)
    return out


# ---- the models, built by the kit's loaders from configs -------------------------------------------------------
def load_config(path: str, trust_remote_code=False, layers: Optional[int] = None):
    try:
        conf = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SystemExit(f"plan: cannot load the config of {path!r}: {str(e).splitlines()[0]}")
    if layers is not None:
        conf.num_hidden_layers = layers
        if getattr(conf, "layer_types", None):
            conf.layer_types = conf.layer_types[:layers]
    return conf


def _pad(conf) -> int:
    eos = conf.eos_token_id[0] if isinstance(conf.eos_token_id, list) else conf.eos_token_id
    return conf.pad_token_id if conf.pad_token_id is not None else eos if eos is not None else 0


class StubTokenizer:
    """One token per character (the plan's prompts are strings of the length it wants), the model's special ids."""

    def __init__(self, conf):
        eos = conf.eos_token_id[0] if isinstance(conf.eos_token_id, list) else conf.eos_token_id
        self.eos_token_id = eos if eos is not None else 0
        self.pad_token_id, self.bos_token_id = getattr(conf, "pad_token_id", None), None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3] * len(text)}

    def decode(self, ids, skip_special_tokens=True):
        return "x" * len(ids)


class Int8Linear(torch.nn.Linear):
    """bitsandbytes' Linear8bitLt as the plan sees it: an int8 weight and fp32 row scales (SCB), the bytes
    bitsandbytes stores, multiplied by bitsandbytes' own GPU autograd function (its int8 ops have fake kernels)."""

    def __init__(self, lin: torch.nn.Linear):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = lin.in_features, lin.out_features
        with torch.device("meta"):
            self.weight = torch.nn.Parameter(torch.empty(lin.out_features, lin.in_features, dtype=torch.int8), False)
            self.register_buffer("SCB", torch.empty(lin.out_features))
        self.bias = lin.bias

    def forward(self, x):
        from bitsandbytes.autograd._functions import MatMul8bitLt, MatmulLtState

        state = MatmulLtState()
        state.CB, state.SCB, state.has_fp16_weights, state.is_training = self.weight, self.SCB, False, self.training
        # threshold 0: LLM.int8's outlier columns (inputs above 6.0, kept in fp16: tokens × a few columns) are data,
        # which fake tensors do not have; everything else is bitsandbytes' own path
        state.threshold = 0.0
        return MatMul8bitLt.apply(x, self.weight, None, self.bias, state).to(x.dtype)


def _int8(model):
    """bitsandbytes' replacement, as transformers does it: every nn.Linear but the output head becomes int8."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = head or getattr(model, "score", None)
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is torch.nn.Linear and child is not head:
                setattr(mod, child_name, Int8Linear(child))
    model.is_loaded_in_8bit = True
    return model


@contextlib.contextmanager
def kit_loaders(fake: _Fake, layers_of):
    """models.load_policy (and what calls it: make_kl, load_generator) with only the weights replaced: a model built
    from its config on the meta device (with layers_of(path) decoder layers), FSDP2 on the fake process group's
    mesh, then made fake. Everything else, memory mode included, is load_policy's own."""
    import torch.distributed.fsdp as fsdp

    real_load, real_shard = models.load_policy, fsdp.fully_shard

    def from_pretrained(path, dtype=None, trust_remote_code=False, quantization_config=None, device_map=None):
        conf = load_config(path, trust_remote_code, layers_of(path))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(conf, dtype=dtype)
        return _int8(model) if quantization_config is not None else model

    def load_policy(cfg, device, checkpoint=None, shard=False, frozen=False):
        model, tok = real_load(cfg, torch.device("meta"), checkpoint=checkpoint, shard=shard, frozen=frozen)
        model = fake.materialize(model)
        model._raft_packing_exact = True  # shapes are the same packed or not at the worst case; Llama packs exactly
        model._raft_sharing_exact = False  # the worst case: no two samples share a prompt (--ranking local keeps one)
        return model, tok

    tokenizer = lambda path, cfg: (StubTokenizer(load_config(path, cfg.trust_remote_code)), 1 << 30)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(models.AutoModelForCausalLM, "from_pretrained", from_pretrained))
        stack.enter_context(mock.patch.object(models, "load_tokenizer", tokenizer))
        stack.enter_context(mock.patch.object(models, "load_policy", load_policy))
        shard = lambda m, **kw: real_shard(m, **{**kw, "mesh": fake.mesh})  # noqa: E731 (the fake group's mesh)
        stack.enter_context(mock.patch.object(fsdp, "fully_shard", shard))
        yield


def reward_model(fake: _Fake, path: str, cfg, layers: Optional[int]):
    """reward.py's reward model as it sits on a GPU: bf16 (or int8 with --reward_load_in_8bit), a one-label head."""
    conf = load_config(path, cfg.trust_remote_code, layers)
    conf.num_labels, conf.pad_token_id, conf.use_cache = 1, _pad(conf), False  # as reward.py sets them
    with torch.device("meta"):
        rm = AutoModelForSequenceClassification.from_config(conf, dtype=torch.bfloat16)
    if cfg.reward_load_in_8bit:
        rm = _int8(rm)
    return fake.materialize(rm).eval()


# ---- one stage's phases, at the worst-case shapes of one rank ---------------------------------------------------
@dataclass
class Shapes:
    world: int
    prompt: int  # tokens of the longest prompt (BOS included)
    new: int  # --max_new_tokens
    rows_gen: int  # prompts per sampling call on one rank
    rows_eval: int
    prompts_rank: int  # prompts one rank samples per stage
    eval_rank: int
    kept_rank: int  # kept samples one rank trains on per epoch
    rows_step: int  # training rows per rank per optimizer step
    reward_text: int  # tokens of the longest reward-model text

    @property
    def example(self):  # the longest training example: prompt + response (+ end token within --max_new_tokens)
        return self.prompt + self.new


def shapes(cfg, world: int, context: int, rm_context: int) -> Shapes:
    P = min(cfg.max_prompt_tokens, context - cfg.max_new_tokens)
    if P < 1:
        raise SystemExit(f"plan: the model's context ({context}) leaves no room for --max_new_tokens "
                         f"{cfg.max_new_tokens}")  # fmt: skip
    per = cfg.prompts_per_stage // world
    per_eval = math.ceil(cfg.eval_prompts / world)
    kept = cfg.prompts_per_stage * (cfg.K if cfg.ranking in ("positive", "all") else 1)  # at most
    step_rows = math.ceil(cfg.train_batch_size / world)
    return Shapes(
        world=world, prompt=P, new=cfg.max_new_tokens, rows_gen=min(cfg.gen_batch_size, per),
        rows_eval=min(cfg.gen_batch_size, per_eval), prompts_rank=per, eval_rank=per_eval,
        kept_rank=math.ceil(kept / world), rows_step=min(step_rows, 2 * cfg.micro_batch_size),
        reward_text=min(P + cfg.max_new_tokens + 1, rm_context),
    )  # fmt: skip


def _examples(n: int, s: Shapes):
    """n training examples of the longest length: prompt tokens unlabelled, every response token labelled."""
    return [([3] * s.example, [-100] * s.prompt + [3] * s.new) for _ in range(n)]


def run_sample(cfg, m, s: Shapes, tracker, counter, eval_=False):
    """sampling.generate on one call's prompts (fastgen's prefill and two decoding steps), as raft.sample calls it."""
    model = m["policy"] if eval_ else m["generator"] or m["policy"]
    rows, K = (s.rows_eval, cfg.eval_samples) if eval_ else (s.rows_gen, cfg.K)
    # CUDA graphs (one GPU, not FSDP2, not 8-bit) round prompt lengths up to fastgen's bucket of 32
    graphs = cfg.cuda_graphs and not models.fsdp_modules(model) and not cfg.load_in_8bit
    P = -(-s.prompt // 32) * 32 if graphs else s.prompt
    calls, marks = [0], []

    def count(mod, args, kwargs):
        marks.append((counter.flops, counter.ops))
        calls[0] += 1
        tracker.label = "prefill" if calls[0] == 1 else "decode"
        if calls[0] > 3:  # prefill, step 1, step 2: the cache is allocated once, every step is alike
            raise _Stop

    def attention(*args, **kwargs):
        tracker.in_kv = True
        try:
            return fastgen._attention(*args, **kwargs)
        finally:
            tracker.in_kv = False

    hook = model.register_forward_pre_hook(count, with_kwargs=True)
    from transformers import AttentionInterface

    AttentionInterface.register(fastgen.ATTN, attention)
    plain = dataclasses.replace(cfg, gen_backend="fast", gen_dequantized=False)
    try:
        with contextlib.suppress(_Stop):
            sampling.generate(model, m["tok"], ["x" * P] * rows, K, plain)
    finally:
        AttentionInterface.register(fastgen.ATTN, fastgen._attention)
        hook.remove()
    marks.append((counter.flops, counter.ops))
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:])]  # (FLOPs, ops) of each forward
    last = steps[-1] if len(steps) > 1 else (0, 0)
    return {"prefill_flops": steps[0][0], "step_flops": last[0], "step_ops": last[1]}


def run_score(cfg, m, s: Shapes, tracker, counter, eval_=False):
    """reward.score_ids on one batch of the longest texts, as the reward model scores them."""
    n = min(cfg.reward_batch_size, (s.eval_rank * cfg.eval_samples) if eval_ else s.prompts_rank * cfg.K)
    reward.score_ids(m["reward"], [[3] * s.reward_text] * n, cfg.reward_batch_size, 0)
    return {}


def run_kl(cfg, m, s: Shapes, tracker, counter, eval_=False):
    """The KL term of the ranking score (make_kl's function: the policy's and the reference's log-probs)."""
    m["kl"](_examples(cfg.micro_batch_size, s))
    return {}


def run_old(cfg, m, s: Shapes, tracker, counter):
    """measure_policy's pass before fine-tuning: π_old, entropy, the KL to stage 0 (policy_pass, one batch)."""
    kl = m["kl"]
    models.policy_pass(m["policy"], _examples(min(cfg.micro_batch_size, s.kept_rank), s), cfg.micro_batch_size,
                       cfg.bf16, cfg.temperature or 1.0, kl.reference if kl else None, spread=False)  # fmt: skip
    return {}


def run_train(cfg, m, s: Shapes, tracker, counter):
    """raft.finetune on one rank's rows of one optimizer step (two micro-steps when there are several: from the
    second on, gradients are held between them), after AdamW's state exists: a second step's memory."""
    n = s.rows_step
    ex = _examples(n, s)
    old = None
    if cfg.loss != "sft":
        old = [torch.zeros(s.new) for _ in range(n)]
    one = dataclasses.replace(cfg, train_batch_size=n, epochs=1, regime="raft")
    raft.finetune(m["policy"], ex, one, 0, spread=False, kept=[(i, 0, 1.0) for i in range(n)], old=old,
                  opt=m["opt"])  # fmt: skip
    return {"micro_steps": math.ceil(n / cfg.micro_batch_size)}


def prime(model, cfg):
    """The AdamW of make_optimizer with its state made (one step on zero gradients), as after a first real step."""
    opt = models.make_optimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


PHASES = {  # name: (runner, the model family whose layers it runs, its keyword arguments)
    "sample": (run_sample, "generator", {}),
    "rank: reward model": (run_score, "reward", {}),
    "rank: KL term": (run_kl, "policy", {}),
    "train: π_old pass": (run_old, "policy", {}),
    "train: fine-tune": (run_train, "policy", {}),
    "eval: sample": (run_sample, "policy", {"eval_": True}),
    "eval: reward model": (run_score, "reward", {"eval_": True}),
    "eval: KL term": (run_kl, "policy", {"eval_": True}),
}


def phases(cfg, rm_path) -> list[str]:
    kl = cfg.kl_beta > 0 or cfg.eval_kl
    out = ["sample"] + (["rank: reward model"] if rm_path else []) + (["rank: KL term"] if kl else [])
    out += ["train: π_old pass", "train: fine-tune"]
    if cfg.eval_prompts:
        out += ["eval: sample"] + (["eval: reward model"] if rm_path else []) + (["eval: KL term"] if kl else [])
    return out


def _same_work(name: str, cfg, s: Shapes):
    """Phases that run the same code on the same shapes with the same models resident plan alike."""
    if PHASES[name][0] is run_score:
        ev = name.startswith("eval")
        return ("score", min(cfg.reward_batch_size, s.eval_rank * cfg.eval_samples if ev else s.prompts_rank * cfg.K))
    return ("kl",) if PHASES[name][0] is run_kl else name


def reward_path(cfg) -> Optional[str]:
    """The first --reward that is a model (a directory or a hub id, not file.py:function or module:function)."""
    for spec in cfg.reward:
        if os.path.isdir(spec) or ":" not in spec:
            return spec
    return None


def build(cfg, pa: PlanArgs, fake: _Fake, running: str, layers: Optional[int], rm_path, with_rm: bool) -> dict:
    """The models resident on a rank, by the kit's loaders: the family that runs (policy, generator or reward) with
    `layers` decoder layers, the others whole. Built once per plan and kept (phases leave no gradients behind)."""
    key = (running, layers, with_rm)
    if key in fake.built:
        return fake.built[key]
    dist = pa.nproc_per_node * pa.nnodes > 1 or pa.torchrun
    gen_path = cfg.generator_model
    depth = lambda fam: layers if fam == running else None
    m = {"generator": None, "reward": None}
    with kit_loaders(fake, lambda path: depth("generator" if gen_path and path == gen_path else "policy")):
        m["policy"], m["tok"] = models.load_policy(cfg, torch.device("meta"), shard=dist)
        m["kl"] = models.make_kl(cfg, m["policy"], torch.device("meta"))
        if gen_path:
            m["generator"] = models.load_generator(cfg, m["policy"], m["tok"], torch.device("meta"))[0]
    if with_rm:
        m["reward"] = reward_model(fake, rm_path, cfg, depth("reward"))
    m["run"] = m[running]
    fake.built[key] = m
    return m


def plan_phase(name: str, cfg, pa: PlanArgs, fake: _Fake, s: Shapes, layers: Optional[int], rm_path) -> dict:
    """One phase on fake tensors: the models resident on a rank at that moment, the one that runs built with `layers`
    decoder layers (None: all), the kit's code for it under the tracker. Returns each region's peak and its parts,
    the FLOPs and ops counted, and the sizes the time estimate needs."""
    runner, family, kw = PHASES[name]
    running = "policy" if family == "generator" and not cfg.generator_model else family
    with_rm = bool(rm_path) and (not cfg.offload_reward or family == "reward")  # --offload_reward: only to score
    m = dict(build(cfg, pa, fake, running, layers, rm_path, with_rm))
    m["opt"] = prime(m["policy"], cfg) if cfg.regime == "rl" or name == "train: fine-tune" else None  # AdamW state
    fsdp = bool(models.fsdp_modules(m["policy"]))
    Tracker = _tracker_class(_fsdp_tracker() if fsdp else _plain_tracker())
    tracker = Tracker(m["policy"], m["opt"]) if fsdp else Tracker()
    tracker.resident(*([] if fsdp else [m["policy"], m["opt"]]), _kl_reference(m["kl"]), m["generator"], m["reward"])
    counter = _Factories(fake)
    with tracker, counter:
        start = _parts(tracker.get_tracker_snapshot().get(torch.device("cpu"), {}))  # what is resident
        info = runner(cfg, m, s, tracker, counter, **kw)
    # bytes a decoding step reads: each weight once, in the dtype the matmuls see (bf16 under --bf16)
    read = sum(p.numel() * (2 if cfg.bf16 and p.is_floating_point() else p.element_size())
               for p in m["run"].parameters())  # fmt: skip
    trained = [p for p in m["policy"].parameters() if p.requires_grad]
    return dict(info, regions={r: _parts(snap) for r, snap in tracker.peaks.items()}, start=start, flops=counter.flops,
                ops=counter.ops, params=sum(p.numel() for p in m["run"].parameters()), read_bytes=read,
                trainable_bytes=sum(p.numel() * p.element_size() for p in trained), fsdp=fsdp)  # fmt: skip


def _kl_reference(kl):
    """make_kl's stage-0 copy (full fine-tuning holds a second model; LoRA switches the adapters off instead)."""
    if kl is None or kl.reference.__closure__ is None:
        return None
    cells = [c.cell_contents for c in kl.reference.__closure__]
    return next((c for c in cells if isinstance(c, torch.nn.Module)), None)


def _plain_tracker():
    from torch.distributed._tools.mem_tracker import MemTracker

    return MemTracker


def _fsdp_tracker():
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    return FSDPMemTracker


# ---- the plan: every phase, extrapolated over the layers, the allowance, the verdict -----------------------------
def extrapolate(a: dict, b: dict, da: int, db: int, L: int) -> dict:
    """The counts of a phase at L layers from depths da and db: each is linear in the number of identical decoder
    layers (FLOPs, ops, and each region's peak, part by part); the phase's peak is its largest region's. Checked to
    the byte against full-depth plans (tests/test_plan.py)."""
    line = lambda x, y: x + (y - x) * (L - da) // (db - da)
    out = {k: line(a[k], b[k]) if type(a[k]) is int else a[k] for k in a}
    out["regions"] = {r: {k: line(a["regions"][r][k], b["regions"][r][k]) for k in a["regions"][r]}
                      for r in a["regions"] if r in b["regions"]}  # fmt: skip
    out["start"] = {k: line(a["start"][k], b["start"][k]) for k in a["start"]}
    return out


def settle(p: dict) -> dict:
    """A phase's numbers: its largest region's peak and parts, beside its counts."""
    worst = max(p["regions"], key=lambda r: p["regions"][r]["peak"])
    return {**p, **p["regions"][worst], "region": worst}


def allowance(peak: int, world: int, dist: bool) -> list[tuple[str, float, str]]:
    items = [("CUDA context",) + CONTEXT_GB, ("cuBLAS and cuBLASLt workspaces",) + CUBLAS_GB]
    if dist:
        items.append(("NCCL",) + NCCL_GB)
    items.append(("fragmentation", FRAG[0] * peak / GB, FRAG[1]))
    return items


def make_plan(cfg, pa: PlanArgs, only=None) -> dict:
    """Plan every phase of one stage (or those named in `only`): {phase: parts in bytes, FLOPs, ...}, the shapes."""
    world = pa.nproc_per_node * pa.nnodes
    rm_path = reward_path(cfg)
    trust = cfg.trust_remote_code
    pconf = load_config(cfg.model, trust)
    gconf = load_config(cfg.generator_model, trust) if cfg.generator_model else pconf
    rconf = load_config(rm_path, trust) if rm_path else None
    context = getattr(pconf, "max_position_embeddings", None) or 1 << 30
    rm_context = getattr(rconf, "max_position_embeddings", None) or 1 << 30
    s = shapes(cfg, world, context, rm_context)
    full = pa.depths == "full"
    depths = None if full else [int(x) for x in pa.depths.split(",")]
    fake = _Fake(world)
    out, seen = {}, {}
    try:
        for name in [n for n in phases(cfg, rm_path) if only is None or n in only]:
            key = _same_work(name, cfg, s)
            if key in seen:  # the evaluation's scoring or KL pass on the same batch shapes: the same numbers
                out[name] = dict(seen[key])
                continue
            fam = PHASES[name][1]
            conf = {"policy": pconf, "generator": gconf, "reward": rconf}[fam]
            L = conf.num_hidden_layers
            if full or L <= max(depths):
                out[name] = settle(plan_phase(name, cfg, pa, fake, s, None, rm_path))
            else:
                a, b = (plan_phase(name, cfg, pa, fake, s, d, rm_path) for d in depths)
                out[name] = settle(extrapolate(a, b, depths[0], depths[1], L))
            out[name]["layers"] = L
            seen[key] = out[name]
    finally:
        fake.close()
    return {"phases": out, "shapes": s, "world": world, "rm": rm_path, "confs": (pconf, gconf, rconf)}


def counted(plan: dict, cfg, pa: PlanArgs, name: str) -> int:
    """What the plan counts rather than runs, added to a phase's total: DDP's gradient buckets (LoRA under torchrun:
    a copy of the trainable gradients) while training, --gen_dequantized's bf16 copy of the policy while it samples."""
    dist = plan["world"] > 1 or pa.torchrun
    train = plan["phases"].get("train: fine-tune", {})
    if name == "train: fine-tune" and dist and cfg.lora_r:
        return train["trainable_bytes"]
    if cfg.gen_dequantized and name in ("eval: sample",) + (() if cfg.generator_model else ("sample",)):
        return 2 * train.get("params", 0)
    return 0


def verdict(plan: dict, cfg, pa: PlanArgs) -> dict:
    world = plan["world"]
    dist = world > 1 or pa.torchrun
    mem = (pa.gpu_memory_gb or GPUS[pa.gpu][0]) * GB
    rows = {}
    for name, p in plan["phases"].items():
        extra = sum(x[1] for x in allowance(p["peak"], world, dist)) * GB
        extra += counted(plan, cfg, pa, name)
        rows[name] = {"total": p["peak"] + extra, "allowance": extra, "fits": p["peak"] + extra <= mem}
    return {"rows": rows, "memory": mem, "fits": all(r["fits"] for r in rows.values())}


ACTIVATIONS = ("activations", "KV cache", "temporaries")
FIXES = [  # the changes tried, in order: (flags, the change or None, the phases it can lower; None: every phase)
    ("--gradient_checkpointing", lambda c: None if c.gradient_checkpointing else dict(gradient_checkpointing=True),
     {"train: fine-tune"}),
    ("--micro_batch_size", lambda c: dict(micro_batch_size=c.micro_batch_size // 2) if c.micro_batch_size > 1 else None,
     {"rank: KL term", "train: π_old pass", "train: fine-tune", "eval: KL term"}),
    ("--gen_batch_size", lambda c: dict(gen_batch_size=c.gen_batch_size // 2) if c.gen_batch_size > 1 else None,
     {"sample", "eval: sample"}),
    ("--reward_batch_size", lambda c: dict(reward_batch_size=c.reward_batch_size // 2) if c.reward_batch_size > 1
     else None, {"rank: reward model", "eval: reward model"}),
    ("--offload_reward", lambda c: None if c.offload_reward or c.reward_load_in_8bit else dict(offload_reward=True),
     None),
    ("--lora_r 16 --bf16", lambda c: None if c.lora_r else dict(lora_r=16, bf16=True), None),
    ("--load_in_8bit --lora_r 16 --bf16", lambda c: None if c.load_in_8bit else dict(load_in_8bit=True,
                                                                                     lora_r=c.lora_r or 16, bf16=True),
     None),
]  # fmt: skip


def find_fix(cfg, pa: PlanArgs, plan: dict, v: dict):
    """The first change of FIXES (batch sizes halved until it fits or reaches 1) after which every phase fits, found
    by planning again. A change that only lowers activations is not tried where a failing phase's weights,
    gradients and optimizer state alone (with the allowance) exceed the GPU. Returns (flags, cfg, plan, verdict) or
    None."""
    bad = [n for n in plan["phases"] if not v["rows"][n]["fits"]]
    dist = plan["world"] > 1 or pa.torchrun
    fixed = sum(x[1] for x in allowance(0, plan["world"], dist)) * GB
    if fixed >= v["memory"]:
        return None  # the allowance alone fills the GPU
    for label, how, lowers in FIXES:
        if lowers is not None:
            floors = [plan["phases"][n]["peak"] - sum(plan["phases"][n][k] for k in ACTIVATIONS) for n in bad]
            if not set(bad) <= lowers or max(f * (1 + FRAG[0]) + fixed for f in floors) > v["memory"]:
                continue
        c = cfg
        while (change := how(c)) is not None:
            c = dataclasses.replace(c, **change)
            p = make_plan(c, pa, only=lowers)  # the phases it cannot change keep their numbers
            p["phases"] = {n: p["phases"].get(n) or plan["phases"][n] for n in plan["phases"]}
            v2 = verdict(p, c, pa)
            if v2["fits"]:
                flags = f"{label} {getattr(c, label[2:])}" if label.endswith("size") else label
                return flags, c, p, v2
            if not label.endswith("size"):
                break
    return None


# ---- time: FLOPs and bytes per phase on the named GPU -------------------------------------------------------------
def stage_time(plan: dict, cfg, pa: PlanArgs) -> dict:
    """Seconds per phase of one stage on one rank (an estimate): FLOPs at --mfu of the GPU's bf16 peak, a decoding
    step at the larger of its FLOPs and its bytes (weights read + the KV cache read, at --mbu of the bandwidth)
    plus one kernel launch per op when it runs eagerly, FSDP2's all-gathers and reduce-scatters at --mbu of the
    link. Worst-case lengths throughout, so an upper bound of the compute."""
    _, flops_s, bw, link = GPUS[pa.gpu]
    F, B, LNK = flops_s * 1e12 * pa.mfu, bw * 1e9 * pa.mbu, link * 1e9 * pa.mbu
    s, ph, world = plan["shapes"], plan["phases"], plan["world"]
    P, fsdp = ph["train: fine-tune"]["params"], ph["train: fine-tune"]["fsdp"]  # a DTensor's numel is its full size
    comm = lambda nbytes: nbytes * (world - 1) / world / LNK if fsdp else 0.0
    t = {}

    def sampling(name, prompts, K):
        p = ph[name]
        calls = math.ceil(prompts / (s.rows_eval if "eval" in name else s.rows_gen))
        wbytes = p["read_bytes"]
        graphs = cfg.cuda_graphs and not fsdp and not cfg.load_in_8bit
        step = max(p["step_flops"] / F, (wbytes + p["KV cache"]) / B) + (0 if graphs else p["step_ops"] * LAUNCH_S)
        return calls * (p["prefill_flops"] / F + (cfg.max_new_tokens - 1) * step) + comm(2 * P)

    t["sample"] = sampling("sample", s.prompts_rank, cfg.K)
    for name in ("rank: reward model", "eval: reward model"):
        if name in ph:
            n = s.prompts_rank * cfg.K if name.startswith("rank") else s.eval_rank * cfg.eval_samples
            t[name] = math.ceil(n / cfg.reward_batch_size) * ph[name]["flops"] / F
    for name in ("rank: KL term", "eval: KL term"):
        if name in ph:
            n = s.prompts_rank * cfg.K if name.startswith("rank") else s.eval_rank * cfg.eval_samples
            t[name] = math.ceil(n / cfg.micro_batch_size) * ph[name]["flops"] / F + comm(2 * P)
    t["train: π_old pass"] = math.ceil(s.kept_rank / cfg.micro_batch_size) * ph["train: π_old pass"]["flops"] / F
    steps = cfg.epochs * math.ceil(s.kept_rank * world / cfg.train_batch_size)
    rows = math.ceil(cfg.train_batch_size / world)
    per_step = ph["train: fine-tune"]["flops"] * rows / s.rows_step  # the step planned ran s.rows_step rows
    grads = 4 if not cfg.lora_r else 0
    t["train: fine-tune"] = steps * (per_step / F + comm((2 + 2 + grads) * P))
    if "eval: sample" in ph:
        t["eval: sample"] = sampling("eval: sample", s.eval_rank, cfg.eval_samples)
    return t


# ---- printing --------------------------------------------------------------------------------------------------
def describe(cfg, pa: PlanArgs, plan: dict) -> list[str]:
    s, world = plan["shapes"], plan["world"]
    n, fsdp = plan["phases"]["train: fine-tune"]["params"], plan["phases"]["train: fine-tune"]["fsdp"]
    mode = ("8-bit base + LoRA" if cfg.load_in_8bit else f"{'bf16' if cfg.bf16 else 'fp32'} base + LoRA r={cfg.lora_r}"
            if cfg.lora_r else "full fine-tuning, fp32 weights" + (", bf16 autocast" if cfg.bf16 else ""))  # fmt: skip
    engine = "FSDP2" if fsdp else "DDP" if (world > 1 or pa.torchrun) else "one process"
    mem = pa.gpu_memory_gb or GPUS[pa.gpu][0]
    rm = plan["rm"]
    lines = [
        f"plan: {world} × {pa.gpu} ({mem:g} GB each); policy {cfg.model} ({n / 1e9:.2f}B parameters), {mode}, "
        f"{engine}" + (f"; reward model {rm}" + (" (offloaded)" if cfg.offload_reward else "") if rm else ""),
        f"every rank alike: {s.prompts_rank} prompts sampled {s.rows_gen} at a time × K {cfg.K} rows of "
        f"{s.prompt} + {s.new} tokens; training {s.rows_step} rows × {s.example} tokens per step in micro-batches "
        f"of {cfg.micro_batch_size}" + (f"; reward model {cfg.reward_batch_size} texts × {s.reward_text} tokens"
                                        if rm else ""),
    ]  # fmt: skip
    if pa.depths != "full":
        d = pa.depths.split(",")
        lines.append(f"planned on fake tensors at {d[0]} and {d[1]} decoder layers, extrapolated to the model's "
                     f"(every count is linear in the layers; --depths full runs them all)")  # fmt: skip
    return lines


def table(plan: dict, v: dict) -> list[str]:
    cols = list(PARTS)
    out = [f"{'phase (GB per rank)':<22}{'peak':>7} =" + "".join(f"{c:>12}" for c in cols)
           + f"{'+ allowance':>13}{'= total':>9}  verdict"]  # fmt: skip
    for name, p in plan["phases"].items():
        r = v["rows"][name]
        ok = "fits" if r["fits"] else "DOES NOT FIT"  # "+ allowance" also holds what is counted, not run
        out.append(f"{name:<22}{p['peak'] / GB:>7.1f} =" + "".join(f"{p[c] / GB:>12.2f}" for c in cols)
                   + f"{r['allowance'] / GB:>13.1f}{r['total'] / GB:>9.1f}  {ok}")  # fmt: skip
    return out


def report(cfg, pa: PlanArgs, plan: dict, v: dict) -> list[str]:
    world = plan["world"]
    dist = world > 1 or pa.torchrun
    lines = describe(cfg, pa, plan) + [""] + table(plan, v) + [""]
    worst = max(plan["phases"], key=lambda n: v["rows"][n]["total"])
    lines.append(f"allowance per rank, not seen by any tracker (at {worst}):")
    lines += [f"  {n} {g:.1f} GB: {src}" for n, g, src in allowance(plan["phases"][worst]["peak"], world, dist)]
    notes = []
    if cfg.gen_backend != "fast":
        notes.append(f"--gen_backend {cfg.gen_backend}: sampling planned as --gen_backend fast")
    if cfg.gen_dequantized:
        notes.append(f"--gen_dequantized: + {2 * _params(plan) / GB:.1f} GB while the policy samples (its bf16 copy, "
                     f"2 B a parameter, counted not run; in the totals)")  # fmt: skip
    if cfg.load_in_8bit or cfg.reward_load_in_8bit:
        notes.append("8-bit: bitsandbytes' loader needs a GPU; its int8 layers are stand-ins of the same bytes (int8 "
                     "weight, fp32 row scales) running bitsandbytes' own MatMul8bitLt on fake tensors; the time "
                     "takes int8 decoding at the bytes it reads (reported ≈5× slower than bf16)")  # fmt: skip
    if dist and cfg.lora_r:
        notes.append(f"DDP: + {_ddp_buckets(plan) / GB:.2f} GB of gradient buckets while training (a copy of the "
                     f"trainable gradients, counted from the parameters, not run; in the totals)")  # fmt: skip
    lines += [f"note: {n}" for n in notes]
    mem = v["memory"] / GB
    if v["fits"]:
        spare = mem - v["rows"][worst]["total"] / GB
        how = "fits with a margin" if spare >= MARGIN * mem else f"fits, without a margin (under {MARGIN:.0%})"
        lines.append(f"verdict: {how}: the largest phase ({worst}) needs {v['rows'][worst]['total'] / GB:.1f} of "
                     f"{mem:g} GB, {spare:.1f} GB to spare")  # fmt: skip
    else:
        bad = [n for n in plan["phases"] if not v["rows"][n]["fits"]]
        lines.append(f"verdict: does not fit in {mem:g} GB: " + ", ".join(
            f"{n} needs {v['rows'][n]['total'] / GB:.1f} GB" for n in bad))  # fmt: skip
    return lines


def _params(plan):
    return plan["phases"]["train: fine-tune"]["params"]


def _ddp_buckets(plan):
    return plan["phases"]["train: fine-tune"]["trainable_bytes"]


def time_lines(plan: dict, cfg, pa: PlanArgs) -> list[str]:
    t = stage_time(plan, cfg, pa)
    total = sum(t.values())
    _, tf, bw, link = GPUS[pa.gpu]
    parts = ", ".join(f"{n} {x / 60:.1f}" for n, x in t.items())
    return [
        f"time (an estimate, not measured): {total / 60:.0f} min per stage on {plan['world']} × {pa.gpu} ({parts} "
        f"min); {cfg.stages} stages ≈ {cfg.stages * total / 3600:.1f} h",
        f"assumptions: {tf} TFLOP/s bf16 dense at {pa.mfu:.0%} for prefill, scoring and training; decoding at "
        f"{pa.mbu:.0%} of {bw} GB/s (weights and KV cache read every step), {LAUNCH_S * 1e6:.0f} µs per kernel "
        f"without CUDA graphs; FSDP2 collectives at {pa.mbu:.0%} of {link} GB/s, not overlapped; every prompt and "
        f"response at its longest",
    ]


def parse(argv=None):
    parser = HfArgumentParser((raft.Config, PlanArgs))
    cfg, pa = parser.parse_args_into_dataclasses(args=list(sys.argv[1:] if argv is None else argv))
    world = pa.nproc_per_node * pa.nnodes
    if pa.gpu not in GPUS:
        raise SystemExit(f"plan: --gpu {pa.gpu!r}: choose one of {', '.join(GPUS)} (--gpu_memory_gb sets memory)")
    if min(pa.nproc_per_node, pa.nnodes) < 1 or not 0 < pa.mfu <= 1 or not 0 < pa.mbu <= 1:
        raise SystemExit("plan: --nproc_per_node and --nnodes must be ≥ 1, --mfu and --mbu in (0, 1]")
    if pa.depths != "full" and (len(pa.depths.split(",")) != 2 or not all(x.isdigit() for x in pa.depths.split(","))
                                or len(set(pa.depths.split(","))) != 2):  # fmt: skip
        raise SystemExit(f"plan: --depths {pa.depths!r}: two different layer counts, e.g. 2,3, or full")
    for name in ("prompts_per_stage", "train_batch_size"):
        if getattr(cfg, name) % world:
            raise SystemExit(f"config error: --{name} {getattr(cfg, name)} is not divisible by the {world} "
                             f"processes; use a multiple of {world}")  # fmt: skip
    cfg.dataset = cfg.dataset or "(not loaded)"
    cfg.out_dir = cfg.out_dir or "runs/raft"
    raft.validate(cfg, needs_reward=False)
    if cfg.model is None:
        raise SystemExit("plan: --model is required (a path or hub id with a config.json)")
    return cfg, pa


def main(argv=None) -> int:
    t0 = time.time()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16", every forward
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renamings, once per model built
    cfg, pa = parse(argv)
    torch.manual_seed(0)
    plan = make_plan(cfg, pa)
    v = verdict(plan, cfg, pa)
    for line in report(cfg, pa, plan, v) + time_lines(plan, cfg, pa):
        print(line, flush=True)
    code = 0
    if not v["fits"]:
        code = 3
        fix = find_fix(cfg, pa, plan, v) if pa.find_fix else None
        if fix:
            flags, c, p, v2 = fix
            worst = max(p["phases"], key=lambda n: v2["rows"][n]["total"])
            print(f"fix: {flags} fits (planned again: the largest phase, {worst}, needs "
                  f"{v2['rows'][worst]['total'] / GB:.1f} GB)", flush=True)  # fmt: skip
        elif pa.find_fix:
            print("fix: none of " + ", ".join(f[0] for f in FIXES) + " fits alone; more GPUs (FSDP2 shards the "
                  "weights) or a larger GPU", flush=True)  # fmt: skip
    print(f"planned in {time.time() - t0:.0f} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
