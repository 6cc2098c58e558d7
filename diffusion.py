"""RAFT for diffusion models: raft.py's loop on a text-to-image model in the Stable Diffusion layout (unet/, vae/,
text_encoder/, tokenizer/, scheduler/). Each stage samples K images per prompt with DDIM (eta 0, each image from its
own seeded noise), ranks them by an image reward with raft.select (by default the best per prompt, as in the paper),
and fine-tunes LoRA adapters on the UNet's attention projections on the kept images; the starting model and every
stage are scored on the same eval noise. The denoising loop is our own over diffusers' UNet, VAE and scheduler, not
StableDiffusionPipeline.
Left out: one process only (no torchrun) and no --resume; GPU time per stage is not measured yet.
docs/diffusion.md has the details: the paper's setup, where each default comes from, rewards, outputs, the demo.

    python diffusion.py      # offline demo: a tiny SD-shaped model learns brighter images (docs/diffusion.md)
    python diffusion.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --reward aesthetic \\
        --aesthetic_head sa_0_4_vit_l_14_linear.pth --bf16 --out_dir runs/sd15_aesthetic   # the paper's setup
"""

import dataclasses
import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from transformers import HfArgumentParser

from data import completed_stages, load_prompts, write_jsonl, write_metrics, write_text
from metrics import plot_rewards
from dist import phase, pick_device
from data import stage_prompts
from checks import check_device, finite
from raft import select
from reward import load_reward, parse_weights, score

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PREDICTIONS = ("epsilon", "v_prediction")  # what the UNet predicts; finetune has a training target for these only


@dataclass
class DiffusionConfig:
    # ---- model, prompts, reward
    model: Optional[str] = field(
        default=None,
        metadata={
            "help": "Hub id or path of a Stable Diffusion checkpoint in diffusers layout (the paper: SD 1.5, "
            "stable-diffusion-v1-5/stable-diffusion-v1-5). None runs the offline demo."
        },
    )
    prompts: Optional[str] = field(
        default=None,
        metadata={
            "help": "A .txt file (one prompt per line) or a .jsonl/.json file with a `prompt` field. Default: the 10 "
            "CIFAR-10 class names (the paper)."
        },
    )
    reward: list[str] = field(
        default_factory=list,
        metadata={
            "action": "extend",
            "help": "aesthetic (the paper; the default), clip_score, jpeg_compressibility, jpeg_incompressibility, "
            "brightness, or file.py:function / module:function f(prompts, images: list[PIL.Image]) -> list[float]; "
            "repeat for a weighted sum.",
        },
    )
    reward_weights: str = field(
        default="", metadata={"help": "Comma-separated weights of several --reward, e.g. 1,0.5 (default: all 1)."}
    )
    clip_model: str = field(
        default="openai/clip-vit-large-patch14",
        metadata={
            "help": "CLIP hub id or path for aesthetic (its image embedding) and clip_score: LAION's predictor reads "
            "CLIP ViT-L/14 image embeddings."
        },
    )
    aesthetic_head: Optional[str] = field(
        default=None,
        metadata={
            "help": "Path of LAION's aesthetic head (.pth or .safetensors): Linear(768, 1) "
            "(sa_0_4_vit_l_14_linear.pth) or improved-aesthetic-predictor's linear MLP "
            "(sac+logos+ava1-l14-linearMSE.pth)."
        },
    )
    reward_batch_size: int = field(default=32, metadata={"help": "Images per CLIP forward pass."})
    # ---- step 1: sample
    prompts_per_stage: int = field(
        default=10,
        metadata={
            "help": "b, prompts per stage (default: the 10 CIFAR-10 names once; the per-stage batch is not in our "
            "notes of the paper)."
        },
    )
    K: int = field(
        default=8,
        metadata={"help": "Images per prompt (no diffusion value found in the paper; the LLM runs' smallest K)."},
    )
    resolution: int = field(default=256, metadata={"help": "Image height and width (the paper: 256)."})
    steps: int = field(
        default=50, metadata={"help": "DDIM sampling steps (50: StableDiffusionPipeline's default, and DDPO's)."}
    )
    guidance: float = field(
        default=7.5,
        metadata={
            "help": "Classifier-free guidance scale (7.5: StableDiffusionPipeline's default); ≤ 1 turns guidance off "
            "and halves the UNet passes."
        },
    )
    sample_batch_size: int = field(
        default=16,
        metadata={"help": "Images per denoising batch (2 UNet rows each with guidance); lower it if memory runs out."},
    )
    # ---- step 2: rank
    ranking: str = field(
        default="local",
        metadata={
            "help": "local: the best image per prompt (paper); global: the top b of all b·K (paper appendix, LLM); "
            "random: one random image per prompt (control)."
        },
    )
    # ---- step 3: fine-tune
    lora_r: int = field(
        default=4,
        metadata={
            "help": "LoRA rank on the UNet (the paper fine-tunes with LoRA; 4 is diffusers' "
            "train_text_to_image_lora.py default)."
        },
    )
    lora_alpha: int = field(
        default=4, metadata={"help": "LoRA alpha (= the rank, as diffusers' LoRA script: scale 1)."}
    )
    lora_target_modules: str = field(
        default="to_q,to_k,to_v,to_out.0",
        metadata={
            "help": "Comma-separated UNet modules that get adapters: the attention projections (diffusers' LoRA "
            "script)."
        },
    )
    lr: float = field(
        default=1e-4,
        metadata={"help": "AdamW learning rate, constant (diffusers' LoRA script; no value found in the paper)."},
    )
    epochs: int = field(
        default=2,
        metadata={"help": "Passes over each stage's kept images (the paper's LLM value; not stated for diffusion)."},
    )
    train_batch_size: int = field(default=8, metadata={"help": "Images per optimizer step (not stated in the paper)."})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay (diffusers' LoRA script default)."})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Gradient clipping norm (diffusers' LoRA script default)."}
    )
    bf16: bool = field(
        default=False,
        metadata={
            "help": "Frozen weights stored and run in bf16 (autocast); the LoRA weights and AdamW states stay fp32. "
            "For GPUs."
        },
    )
    # ---- loop and output
    stages: int = field(
        default=10, metadata={"help": "RAFT stages (the paper's LLM runs: ≈10–18, until the reward stops rising)."}
    )
    eval_images: int = field(
        default=4,
        metadata={"help": "Images per prompt scored after every stage, from the same noise every stage (0: no eval)."},
    )
    seed: int = field(
        default=42,
        metadata={
            "help": "Seeds the prompt order, all noise, the LoRA init and the training order; a CPU run repeats "
            "exactly."
        },
    )
    out_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "Run directory, new or empty: config.json, metrics.jsonl, reward_curve.png, stage_XXXX/. Default "
            "runs/diffusion (runs/diffusion_demo for the demo)."
        },
    )
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu or cuda."})
    demo_dir: str = field(
        default="runs/diffusion_demo_model",
        metadata={"help": "Demo only: where the tiny SD-shaped model is built once (≈20 s) and reused."},
    )


# The demo: values for fields left at their defaults when no --model is given. A stronger fine-tune per stage (lr,
# epochs, rank) than the paper's defaults, so a tiny model shows the effect within 3 stages on a 2-core CPU.
DEMO = dict(
    reward=["brightness"],
    prompts_per_stage=20,
    resolution=32,
    steps=10,
    guidance=2.0,
    lora_r=8,
    lora_alpha=8,
    lr=1e-2,
    epochs=20,
    train_batch_size=10,
    stages=3,
    out_dir="runs/diffusion_demo",
)
# raft.select's rankings of scores (its positive keeps rewards ≥ 1 and all keeps every image: no ranking of images)
RANKINGS = ("local", "global", "random")
BUILTIN = ("aesthetic", "clip_score", "jpeg_compressibility", "jpeg_incompressibility", "brightness")
GRID_CELL = 128  # grid.png cells are at most this many pixels wide; the kept images are saved whole


def validate(cfg: DiffusionConfig):
    """Every check that needs no model, with the fix in the message."""

    def need(ok, msg):
        if not ok:
            raise SystemExit(f"config error: {msg}")

    need(cfg.K >= 1, f"--K {cfg.K}: need at least 1 image per prompt")
    need(
        min(
            cfg.prompts_per_stage,
            cfg.stages,
            cfg.steps,
            cfg.epochs,
            cfg.lora_r,
            cfg.sample_batch_size,
            cfg.train_batch_size,
            cfg.reward_batch_size,
        )
        >= 1,
        "--prompts_per_stage, --stages, --steps, --epochs, --lora_r and the batch sizes must be ≥ 1",
    )
    need(
        cfg.resolution >= 8 and cfg.resolution % 8 == 0, f"--resolution {cfg.resolution}: use a multiple of 8, e.g. 256"
    )
    need(cfg.ranking in RANKINGS, f"--ranking {cfg.ranking!r}: choose one of {RANKINGS}")
    finite(cfg, "lr", "guidance", "weight_decay")
    need(cfg.lr > 0 and cfg.eval_images >= 0 and cfg.guidance >= 0, "--lr > 0, --eval_images ≥ 0, --guidance ≥ 0")
    need(cfg.weight_decay >= 0 and cfg.max_grad_norm > 0, "--weight_decay ≥ 0; --max_grad_norm > 0 (inf: no clipping)")
    need(cfg.lora_alpha > 0, f"--lora_alpha {cfg.lora_alpha}: must be > 0 (the update is scaled by alpha / r)")
    check_device(cfg.device)
    for spec in cfg.reward:
        need(
            spec in BUILTIN or ":" in spec,
            f"--reward {spec!r}: choose one of {', '.join(BUILTIN)}, or give file.py:function or module:function",
        )
    need(
        "aesthetic" not in cfg.reward or cfg.aesthetic_head,
        "--reward aesthetic needs --aesthetic_head (LAION's "
        "sa_0_4_vit_l_14_linear.pth or sac+logos+ava1-l14-linearMSE.pth)",
    )
    parse_weights(cfg.reward_weights, len(cfg.reward))
    need(cfg.prompts is None or os.path.isfile(cfg.prompts), f"--prompts {cfg.prompts!r}: no such file")
    need(
        not (os.path.isdir(cfg.out_dir) and os.listdir(cfg.out_dir)),
        f"--out_dir {cfg.out_dir} is not empty; choose a new directory",
    )
    parent = os.path.abspath(cfg.out_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    need(os.access(parent, os.W_OK), f"--out_dir {cfg.out_dir}: {parent} is not writable; choose another directory")


def load_prompt_list(cfg: DiffusionConfig) -> list[str]:
    """--prompts (.txt: one a line; .jsonl/.json: the `prompt` field, read by data.load_prompts), else CIFAR-10."""
    if cfg.prompts is None:
        return list(CIFAR10)
    if not cfg.prompts.endswith(".txt"):
        return [r["prompt"] for r in load_prompts(cfg.prompts, prompt_format="raw")[0]]
    with open(cfg.prompts, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise SystemExit(f"--prompts {cfg.prompts!r} has no prompts; write one prompt per line")
    return prompts


# ---- rewards on images: f(prompts, images: list[PIL.Image]) -> list[float] ----------------------------------
def brightness(prompts, images):
    """Mean pixel value in [0, 1]: the demo's reward (no weights, and a tiny model can learn it)."""
    return [float(np.asarray(im, dtype=np.float32).mean() / 255) for im in images]


def jpeg_incompressibility(prompts, images):
    """Size in kB of the image saved as JPEG at quality 95 (DDPO's incompressibility reward)."""
    sizes = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000)
    return sizes


def jpeg_compressibility(prompts, images):
    """Minus the JPEG size in kB at quality 95 (DDPO's compressibility reward)."""
    return [-s for s in jpeg_incompressibility(prompts, images)]


def linear_head(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """LAION's aesthetic head as one affine map: W [1, d], b [1]. The file is a state dict of Linear layers applied in
    order with nothing between them: `weight`/`bias` (sa_0_4_vit_l_14_linear.pth, Linear(768, 1)) or
    `layers.{0,2,4,6,7}.weight/bias` (improved-aesthetic-predictor's MLP 768-1024-128-64-16-1, whose only other
    layers are dropouts, inactive when scoring), so the chain composes into one Linear. Both read L2-normalised CLIP
    ViT-L/14 image embeddings."""
    if not os.path.isfile(path):
        raise SystemExit(f"--aesthetic_head {path!r}: no such file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    layers = sorted(
        {k.rpartition(".")[0] for k in state}, key=lambda p: [int(x) if x.isdigit() else x for x in p.split(".")]
    )
    W = b = None
    for p in layers:  # W_n(…(W_1 x + b_1)…) + b_n = (W_n…W_1) x + (accumulated bias)
        name = f"{p}." if p else ""
        w, c = state[name + "weight"].float(), state[name + "bias"].float()
        W, b = (w, c) if W is None else (w @ W, w @ b + c)
    if W is None or W.shape[0] != 1:
        raise SystemExit(f"--aesthetic_head {path!r}: expected Linear layers (weight, bias) ending in 1 output")
    return W, b


def clip_reward(kind: str, cfg: DiffusionConfig, device):
    """aesthetic: LAION's head on the normalised CLIP image embedding; clip_score: the cosine of CLIP's image and
    prompt embeddings. Images go through the CLIP model's own image processor; fp32, in batches."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    W, b = linear_head(cfg.aesthetic_head) if kind == "aesthetic" else (None, None)  # a bad file fails before CLIP
    try:  # the whole CLIPModel even for aesthetic: CLIPVisionModelWithProjection loaded from a CLIP checkpoint
        # takes projection_dim from the vision config and may re-initialise visual_projection (seen in transformers 5)
        proc = AutoImageProcessor.from_pretrained(cfg.clip_model)
        model = CLIPModel.from_pretrained(cfg.clip_model).to(device).eval()
        tok = AutoTokenizer.from_pretrained(cfg.clip_model) if kind == "clip_score" else None
    except (OSError, ValueError) as e:
        raise SystemExit(f"--clip_model {cfg.clip_model!r}: cannot load a CLIP model ({str(e).splitlines()[0]})")

    @torch.no_grad()
    def fn(prompts, images):
        out, n = [], cfg.reward_batch_size
        for s in range(0, len(images), n):
            px = proc(images=images[s : s + n], return_tensors="pt")["pixel_values"].to(device)
            if kind == "aesthetic":
                emb = model.visual_projection(model.vision_model(pixel_values=px).pooler_output)  # [B, 768] ViT-L/14
                emb = F.normalize(emb.float(), dim=-1)
                out += (emb @ W.T.to(device) + b.to(device)).flatten().tolist()
            else:
                ids = tok(
                    prompts[s : s + n],
                    padding=True,
                    truncation=True,
                    return_tensors="pt",
                    max_length=model.config.text_config.max_position_embeddings,
                )
                o = model(pixel_values=px, **{k: v.to(device) for k, v in ids.items()})
                out += (o.image_embeds * o.text_embeds).sum(-1).tolist()  # both L2-normalised: the cosine
        return out

    return fn


def load_image_rewards(cfg: DiffusionConfig, device):
    """One reward r = Σ w_i r_i over --reward; fn.stats holds the last call's per-reward means (several rewards)."""
    w = parse_weights(cfg.reward_weights, len(cfg.reward))
    offline = {
        "brightness": brightness,
        "jpeg_compressibility": jpeg_compressibility,
        "jpeg_incompressibility": jpeg_incompressibility,
    }
    fns = [offline.get(s) or (clip_reward(s, cfg, device) if s in BUILTIN else load_reward(s)) for s in cfg.reward]

    def combined(prompts, images):
        parts = [score(f, prompts, images, s) for f, s in zip(fns, cfg.reward)]  # one-line errors; NaN for inf
        combined.stats = {f"reward_{i}_mean": float(np.nanmean(v)) for i, v in enumerate(parts)} if len(fns) > 1 else {}
        return [sum(wi * v for wi, v in zip(w, vals)) for vals in zip(*parts)]

    combined.stats = {}
    return combined


# ---- the model: tokenizer, CLIP text encoder, VAE, UNet (+ LoRA), DDIM scheduler ---------------------------
def load_sd(cfg: DiffusionConfig, device) -> SimpleNamespace:
    """The checkpoint's parts, frozen, with LoRA adapters (seeded init) on the UNet's attention projections."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import AutoTokenizer, CLIPTextModel

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    try:
        sd = SimpleNamespace(
            tok=AutoTokenizer.from_pretrained(cfg.model, subfolder="tokenizer"),
            text=CLIPTextModel.from_pretrained(cfg.model, subfolder="text_encoder", dtype=dtype),
            vae=AutoencoderKL.from_pretrained(cfg.model, subfolder="vae", torch_dtype=dtype),
            unet=UNet2DConditionModel.from_pretrained(cfg.model, subfolder="unet", torch_dtype=dtype),
            # DDIM on the checkpoint's noise schedule (SD 1.5 ships PNDM settings; the betas are what matter)
            sched=DDIMScheduler.from_pretrained(cfg.model, subfolder="scheduler"),
        )
    except (OSError, ValueError) as e:
        raise SystemExit(
            f"--model {cfg.model!r}: cannot load a Stable Diffusion checkpoint in diffusers layout "
            f"(unet/ vae/ text_encoder/ tokenizer/ scheduler/): {str(e).splitlines()[0]}"
        )
    prediction_type(sd.sched)  # a "sample" model trained toward the noise would be wrong without a word: stop now
    for m in (sd.text, sd.vae, sd.unet):
        m.requires_grad_(False).to(device).eval()
    sd.factor = 2 ** (len(sd.vae.config.block_out_channels) - 1)  # the VAE's downsampling: 8 for SD
    multiple = sd.factor * 2 ** (len(sd.unet.config.block_out_channels) - 1)
    if cfg.resolution % multiple:
        raise SystemExit(f"--resolution {cfg.resolution}: this model needs a multiple of {multiple}")
    torch.manual_seed(cfg.seed)  # the adapters' random init: same seed, same run
    sd.unet.add_adapter(
        LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            init_lora_weights="gaussian",
            target_modules=cfg.lora_target_modules.split(","),
        )
    )
    for p in sd.unet.parameters():
        if p.requires_grad:  # only the adapters train; they and their AdamW states stay fp32 under --bf16
            p.data = p.data.float()
    sd.device, sd.amp = device, lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    return sd


def encode_text(sd, prompts: list[str]) -> torch.Tensor:
    """CLIP text features [B, L, D] of the prompts padded to L tokens (77 for SD), as SD conditions on them."""
    L = min(sd.tok.model_max_length, sd.text.config.max_position_embeddings)
    ids = sd.tok(prompts, padding="max_length", max_length=L, truncation=True, return_tensors="pt").input_ids
    with sd.amp():
        return sd.text(ids.to(sd.device))[0]


# ---- step 1: sample ----------------------------------------------------------------------------------------
def noise_seed(*parts) -> int:
    """A 63-bit seed from (seed, stage, position, k): distinct tuples give unrelated noise."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def to_pil(x: torch.Tensor) -> list:
    """[B, 3, H, W] in [-1, 1] -> 8-bit RGB images: what a reward sees, what is saved and what is trained on."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in x]


@torch.no_grad()
def sample(sd, prompts: list[str], seeds: list[int], cfg: DiffusionConfig) -> list:
    """One image per (prompt, seed): DDIM (eta 0: deterministic) from the seed's noise, classifier-free guidance."""
    h = cfg.resolution // sd.factor
    guided = cfg.guidance > 1
    sd.sched.set_timesteps(cfg.steps)
    images = []
    for s in range(0, len(prompts), cfg.sample_batch_size):
        ps, ss = prompts[s : s + cfg.sample_batch_size], seeds[s : s + cfg.sample_batch_size]
        ctx = encode_text(sd, ([""] * len(ps) if guided else []) + ps)  # [(2·)B, L, D], unconditional rows first
        # noise drawn on the CPU from each image's own generator: the same noise on any device and in any batch
        z = (
            torch.stack(
                [torch.randn(sd.unet.config.in_channels, h, h, generator=torch.Generator().manual_seed(x)) for x in ss]
            ).to(sd.device)
            * sd.sched.init_noise_sigma
        )  # [B, 4, h, h]
        for t in sd.sched.timesteps:
            with sd.amp():
                eps = sd.unet(torch.cat([z, z]) if guided else z, t, encoder_hidden_states=ctx).sample.float()
            if guided:
                uncond, cond = eps.chunk(2)
                eps = uncond + cfg.guidance * (cond - uncond)
            z = sd.sched.step(eps, t, z, eta=0.0).prev_sample
        with sd.amp():
            images += to_pil(sd.vae.decode(z / sd.vae.config.scaling_factor).sample)
    return images


def grid(images: list, cols: int, framed=()) -> Image.Image:
    """Rows of `cols` images (a row per prompt), cells at most GRID_CELL wide; indices in `framed` (kept) framed red."""
    w = min(images[0].width, GRID_CELL)
    out = Image.new("RGB", (cols * w, math.ceil(len(images) / cols) * w), "white")
    draw = ImageDraw.Draw(out)
    for i, im in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * w
        out.paste(im.resize((w, w)), (x, y))
        if i in framed:
            draw.rectangle([x, y, x + w - 1, y + w - 1], outline=(255, 0, 0), width=max(1, w // 32))
    return out


# ---- step 2: rank -------------------------------------------------------------------------------------------
def rank(rewards: torch.Tensor, mode: str, gen: torch.Generator) -> list[int]:
    """Indices into the prompt-major b·K images of those kept, from rewards [b, K] (raft.select: local, global or
    random); an image with a NaN reward is never kept, and a prompt with none left keeps nothing."""
    valid = ~rewards.isnan()
    return [j * rewards.shape[1] + k for j, k in select(rewards.masked_fill(~valid, 0.0), valid, mode, gen)]


# ---- step 3: fine-tune -------------------------------------------------------------------------------------
def prediction_type(sched) -> str:
    kind = sched.config.prediction_type
    if kind not in PREDICTIONS:
        raise SystemExit(
            f"--model: its scheduler's prediction_type is {kind!r}; diffusion.py trains epsilon or v_prediction"
        )
    return kind


def denoising_target(sched, z0, noise, t):
    """What the UNet learns to predict from the noisy latents: the noise (epsilon) or v = √ᾱ_t ε - √(1-ᾱ_t) z0."""
    return sched.get_velocity(z0, noise, t) if prediction_type(sched) == "v_prediction" else noise


def finetune(sd, images: list, prompts: list[str], cfg: DiffusionConfig, seed: int) -> float:
    """Train what requires grad in sd.unet (the LoRA adapters) on (image, prompt) pairs with the denoising loss.
    Returns the mean loss of the last epoch."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the frozen VAE and text encoder run once per stage, not once per epoch
        px = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)
        px = (px.float() / 127.5 - 1).to(sd.device)  # [N, 3, H, W] in [-1, 1]
        with sd.amp():  # the posterior mean: a sample (as diffusers' scripts draw) adds the posterior's noise
            z0 = (
                torch.cat(
                    [
                        sd.vae.encode(px[s : s + cfg.train_batch_size]).latent_dist.mean
                        for s in range(0, len(px), cfg.train_batch_size)
                    ]
                ).float()
                * sd.vae.config.scaling_factor
            )
        ctx = encode_text(sd, prompts)  # [N, L, D]
    params = [p for p in sd.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)  # as models.py
    T = sd.sched.config.num_train_timesteps
    sd.unet.train()
    for _ in range(cfg.epochs):
        perm, loss_sum = torch.randperm(len(z0), generator=gen), 0.0
        for s in range(0, len(perm), cfg.train_batch_size):
            idx = perm[s : s + cfg.train_batch_size].to(sd.device)
            noise = torch.randn(z0[idx].shape, generator=gen).to(sd.device)
            t = torch.randint(0, T, (len(idx),), generator=gen).to(sd.device)
            noisy = sd.sched.add_noise(z0[idx], noise, t)  # √ᾱ_t z0 + √(1-ᾱ_t) ε
            target = denoising_target(sd.sched, z0[idx], noise, t)
            with sd.amp():
                pred = sd.unet(noisy, t, encoder_hidden_states=ctx[idx]).sample
            loss = F.mse_loss(pred.float(), target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += loss.item() * len(idx)
    sd.unet.eval()
    return loss_sum / len(z0)


# ---- the loop ----------------------------------------------------------------------------------------------
def evaluate(sd, prompts, reward_fn, cfg: DiffusionConfig):
    """--eval_images per prompt from noise that depends on (--seed, prompt, e) only, so the same every stage.
    Returns (metrics, images, rows for eval.jsonl)."""
    if not cfg.eval_images:
        return {}, [], []
    ps = [p for p in prompts for _ in range(cfg.eval_images)]
    seeds = [noise_seed(cfg.seed, "eval", i, e) for i in range(len(prompts)) for e in range(cfg.eval_images)]
    images = sample(sd, ps, seeds, cfg)
    r = torch.tensor(score(reward_fn, ps, images))
    m = {"eval_reward_mean": r.nanmean().item(), **{f"eval_{k}": v for k, v in reward_fn.stats.items()}}
    return m, images, [{"prompt": p, "seed": s, "reward": v} for p, s, v in zip(ps, seeds, r.tolist())]


def save_stage(out_dir, t, metrics, files: dict):
    """stage_{t:04d}/ written aside and renamed, so a stage directory that exists is whole. files: name -> a PIL
    image, a list of rows (.jsonl), or the UNet, whose LoRA adapters (with their rank and alpha) are written in
    diffusers' format as pytorch_lora_weights.safetensors: `pipe.load_lora_weights(stage_dir)` loads them into a
    StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    final = os.path.join(out_dir, f"stage_{t:04d}")
    tmp = final + ".tmp"
    for name, obj in files.items():
        path = os.path.join(tmp, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(obj, Image.Image):
            obj.save(path)
        elif isinstance(obj, list):
            write_jsonl(path, obj)
        else:
            StableDiffusionPipeline.save_lora_weights(
                tmp,
                unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(obj)),
                unet_lora_adapter_metadata=obj.peft_config["default"].to_dict(),
            )
    os.makedirs(tmp, exist_ok=True)
    write_text(os.path.join(tmp, "metrics.json"), json.dumps(metrics))
    os.replace(tmp, final)


def stage_line(m):
    s = f"stage {m['stage']:>3}"
    if "eval_reward_mean" in m:  # absent with --eval_images 0
        s += f" | eval reward {m['eval_reward_mean']:+.4f}"
    if m["stage"] > 0:
        s += (
            f" | samples {m['reward_mean']:+.4f} kept {m['selected_reward_mean']:+.4f} | loss "
            f"{m['train_loss'] or math.nan:.4f} | s: sample {m['time_sample']:.0f} rank {m['time_rank']:.0f} "
            f"train {m['time_train']:.0f} eval {m['time_eval']:.0f}"
        )
    return s


def run(cfg: DiffusionConfig):
    """The RAFT loop. Returns the metrics rows (stage 0 first) and the model's parts (sd.unet carries the LoRA)."""
    device = pick_device(cfg.device)
    prompts = load_prompt_list(cfg)
    reward_fn = load_image_rewards(cfg, device)
    sd = load_sd(cfg, device)
    os.makedirs(cfg.out_dir, exist_ok=True)  # only now: a bad --model or reward leaves no half-made run directory
    write_text(os.path.join(cfg.out_dir, "config.json"), json.dumps(dataclasses.asdict(cfg), indent=1))
    print(
        f"RAFT diffusion: {len(prompts)} prompts, b={cfg.prompts_per_stage}, K={cfg.K}, {cfg.resolution}px, "
        f"{cfg.steps} DDIM steps, guidance {cfg.guidance}, reward {'+'.join(cfg.reward)}, ranking {cfg.ranking}, "
        f"{cfg.stages} stages on {device}; out_dir {cfg.out_dir}",
        flush=True,
    )
    times = {}
    with phase("eval", times, device):
        m, images, rows = evaluate(sd, prompts, reward_fn, cfg)
    m = {"stage": 0, **m, **times}
    save_stage(
        cfg.out_dir, 0, m, {"eval_grid.png": grid(images, cfg.eval_images), "eval.jsonl": rows} if images else {}
    )
    print(stage_line(m), flush=True)
    for t in range(1, cfg.stages + 1):
        times = {}
        batch = [prompts[i] for i in stage_prompts(len(prompts), cfg.prompts_per_stage, t, cfg.seed)[0]]
        flat_p = [p for p in batch for _ in range(cfg.K)]  # b·K, prompt-major
        seeds = [noise_seed(cfg.seed, t, j, k) for j in range(len(batch)) for k in range(cfg.K)]
        with phase("sample", times, device):
            images = sample(sd, flat_p, seeds, cfg)
        with phase("rank", times, device):
            rewards = torch.tensor(score(reward_fn, flat_p, images)).view(len(batch), cfg.K)
            kept = rank(rewards, cfg.ranking, torch.Generator().manual_seed(cfg.seed + t))
            m = {
                "reward_mean": rewards.nanmean().item(),
                **reward_fn.stats,
                "n_selected": len(kept),
                "selected_reward_mean": rewards.view(-1)[kept].mean().item() if kept else math.nan,
                "samples_nan_reward": int(rewards.isnan().sum()),
            }
        with phase("train", times, device):
            m["train_loss"] = (
                finetune(sd, [images[i] for i in kept], [flat_p[i] for i in kept], cfg, seed=cfg.seed * 1000 + t)
                if kept
                else None
            )
        with phase("eval", times, device):
            em, eval_images, eval_rows = evaluate(sd, prompts, reward_fn, cfg)
        m = {"stage": t, **m, **em, **times}
        files = {
            "grid.png": grid(images, cfg.K, framed=set(kept)),
            "pytorch_lora_weights.safetensors": sd.unet,
            "kept.jsonl": [
                {
                    "prompt": flat_p[i],
                    "image": f"kept/{n:05d}.png",
                    "reward": rewards.view(-1)[i].item(),
                    "rewards": rewards[i // cfg.K].tolist(),
                    "k": i % cfg.K,
                    "seed": seeds[i],
                }
                for n, i in enumerate(kept)
            ],
            **{f"kept/{n:05d}.png": images[i] for n, i in enumerate(kept)},
        }
        if eval_images:
            files.update({"eval_grid.png": grid(eval_images, cfg.eval_images), "eval.jsonl": eval_rows})
        save_stage(cfg.out_dir, t, m, files)
        rows = write_metrics(cfg.out_dir, completed_stages(cfg.out_dir))  # metrics.jsonl, then the curve
        plot_rewards(rows, os.path.join(cfg.out_dir, "reward_curve.png"))
        print(stage_line(m), flush=True)
    with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f], sd


# ---- the demo's model, the command line --------------------------------------------------------------------
def sd15_scheduler():
    """Stable Diffusion 1.5's DDIM noise schedule, for models built from configs (the demo, bench.py's shapes)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)  # fmt: skip


def demo_captions(n: int) -> list[str]:
    """Captions of the demo's n pretraining images: image i has the CIFAR-10 name i % 10, and one image in ten gets the
    empty caption instead (SD's recipe for classifier-free guidance). Which ones are empty does not follow the class:
    in each run of 100 images, image i is empty where i // 10 and i % 10 agree, so each name loses one image in ten
    to the empty caption and every name is shown, "airplane" too."""
    return ["" if (i // 10) % 10 == i % 10 else CIFAR10[i % 10] for i in range(n)]


def prepare_demo(demo_dir: str) -> str:
    """Build once (cached in demo_dir) a tiny SD-shaped model from configs and pretrain it on synthetic 32×32 images,
    as demo.py pretrains its Llama: the VAE as an autoencoder, then the UNet with `finetune` on captions from
    `demo_captions`; the CLIP text encoder stays random. Returns demo_dir."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel

    if os.path.exists(os.path.join(demo_dir, "unet", "config.json")):
        return demo_dir
    t0 = time.time()
    torch.manual_seed(0)
    tok = ByT5Tokenizer()  # byte-level: needs no files
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=None,
        )
    ).requires_grad_(False)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        cross_attention_dim=32,
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,  # 32px -> 8
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=32,
    )
    gen = torch.Generator().manual_seed(0)

    def smooth_images(n):  # [n, 3, 32, 32] in [-1, 1]: a random 4×4 colour field, upsampled, at a random brightness
        x = F.interpolate(torch.rand(n, 3, 4, 4, generator=gen) * 2 - 1, size=32, mode="bilinear")
        return (0.5 * x + torch.rand(n, 1, 1, 1, generator=gen) * 1.6 - 0.8).clamp(-1, 1)

    # a random VAE is no autoencoder: the kept images, encoded again, would give latents unrelated to those that made
    # them, and nothing would be learned
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, foreach=True)
    for _ in range(60):
        x = smooth_images(16)
        loss = F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # SD's convention: latents × scaling_factor have unit variance (0.18215 for SD's VAE)
        vae.register_to_config(scaling_factor=1 / vae.encode(smooth_images(64)).latent_dist.mean.std().item())
    vae.requires_grad_(False).eval()
    sched = sd15_scheduler()  # SD 1.5's noise schedule under DDIM
    sd = SimpleNamespace(
        tok=tok,
        text=text,
        vae=vae,
        unet=unet,
        sched=sched,
        device=torch.device("cpu"),
        amp=lambda: torch.autocast("cpu", enabled=False),
    )
    captions = demo_captions(960)
    pre = DiffusionConfig(lr=2e-3, epochs=5, train_batch_size=32, weight_decay=0.0)  # 150 steps
    unet_loss = finetune(sd, to_pil(smooth_images(960)), captions, pre, seed=0)
    tmp = demo_dir.rstrip("/") + ".tmp"
    for name, part in dict(tokenizer=tok, text_encoder=text, unet=unet, vae=vae, scheduler=sched).items():
        part.save_pretrained(os.path.join(tmp, name))
    os.replace(tmp, demo_dir)
    print(
        f"demo: built the tiny model in {demo_dir} ({time.time() - t0:.0f}s; VAE reconstruction MSE {loss.item():.3f}, "
        f"UNet denoising loss {unet_loss:.3f})",
        flush=True,
    )
    return demo_dir


def parse(argv=None) -> DiffusionConfig:
    cfg = HfArgumentParser(DiffusionConfig).parse_args_into_dataclasses(args=argv)[0]
    if cfg.model is None:  # the offline demo: its values for every field still at its default
        defaults = DiffusionConfig()
        for k, v in DEMO.items():
            if getattr(cfg, k) == getattr(defaults, k):
                setattr(cfg, k, v)
    cfg.reward = cfg.reward or ["aesthetic"]
    cfg.out_dir = cfg.out_dir or "runs/diffusion"
    validate(cfg)
    return cfg


def main(argv=None):
    cfg = parse(argv)
    demo = cfg.model is None
    if demo:
        cfg.model = prepare_demo(cfg.demo_dir)
    t0 = time.time()
    rows, _ = run(cfg)
    if demo and cfg.eval_images:  # --eval_images 0: no eval reward to compare
        print(
            f"\ndemo: eval {'+'.join(cfg.reward)} {rows[0]['eval_reward_mean']:.4f} -> "
            f"{rows[-1]['eval_reward_mean']:.4f} after {cfg.stages} stages ({time.time() - t0:.0f}s)"
        )
    print(f"outputs: {os.path.abspath(cfg.out_dir)} (metrics.jsonl, reward_curve.png, stage_XXXX/)", flush=True)
    return rows


if __name__ == "__main__":
    main()
