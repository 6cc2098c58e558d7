"""The policy in its memory mode, and what torchrun's engines need of it (raft.py's models; also bench.py's).

- `load_policy(cfg, device, checkpoint, shard, frozen)`: cfg.model or a stage checkpoint, as
  - full fine-tuning: fp32 weights (with --bf16 they stay fp32 master weights and raft.py computes in bf16 under
    autocast: a 2e-5 AdamW step is below half a bf16 unit of a typical weight and would round away);
  - LoRA (--lora_r > 0, peft): a frozen base (bf16 under --bf16) with trainable fp32 adapters;
  - 8-bit base + LoRA (--load_in_8bit, bitsandbytes, peft's k-bit preparation);
  a frozen copy (the KL reference, a generator) is bf16 under --bf16. Under torchrun (shard=True) full
  fine-tuning is sharded with FSDP2's `fully_shard`, one group per decoder layer; LoRA stays whole (raft.py wraps
  it in DDP while training).
- `full_weights(model)`: an FSDP2 model gathered once for a whole inference phase; `full_state_dict(model)`: its
  full weights on rank 0 for saving; `fsdp_modules(model)`: its shard groups (none: not sharded).
- `dequantized_copy(model)`: --gen_dequantized, a plain bf16 copy of an 8-bit LoRA policy for sampling.
- `save_merged(cfg, adapter_dir, out)`: --merge_lora.
- `load_tokenizer(path, cfg)`: a model's tokenizer and context length, before any weights load.
"""

import contextlib
import copy
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from data import save_model_dir


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


def load_policy(cfg, device, checkpoint: Optional[str] = None, shard=False, frozen=False):
    """The policy and its tokenizer: cfg.model, or a stage checkpoint (a full model, or LoRA adapters on cfg.model),
    in the memory mode of cfg (fp32 / bf16 base + LoRA / 8-bit base + LoRA). shard (raft.py passes True under
    torchrun): full fine-tuning is sharded with FSDP2. One-line errors for the usual mistakes."""
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
    try:
        model = AutoModelForCausalLM.from_pretrained(base, **kw)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--model {base!r}: cannot load a causal LM (is it one?): {str(e).splitlines()[0]}")
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
                    task_type="CAUSAL_LM",
                    target_modules=targets if targets == "all-linear" else targets.split(","),
                ),
            )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = True  # generation still uses the KV cache; training passes use_cache=False
    if shard and not cfg.lora_r:
        # full fine-tuning under torchrun: FSDP2 shards weights, grads and AdamW states (a 7B model with fp32
        # AdamW needs ≈112 GB, ≈14 GB per rank on 8); one shard group per decoder layer, plus the rest at the root
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cfg.bf16 else None, reduce_dtype=torch.float32)
        for layer in [m for m in model.modules() if type(m).__name__ in (model._no_split_modules or [])]:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
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
