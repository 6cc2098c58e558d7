"""RAFT for diffusion models (diffusion.py), offline, with the demo's tiny SD-shaped model (UNet, VAE, CLIP text
encoder and ByT5 tokenizer built from configs, pretrained a few seconds on synthetic images; built once per session):
two stages raise the brightness reward, train only the LoRA adapters and write every image and grid; the saved
adapters load with diffusers' own loader and give the same images; ranking keeps the right images; the offline, CLIP
and callable rewards score what they should; the demo's pretraining captions show every CIFAR-10 name; bad input
stops with a one-line error before any model is built."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import diffusion as D

# `pytest -n 2`: every test here on one worker, which builds the demo model and runs the two stages once
pytestmark = pytest.mark.xdist_group("diffusion")

HERE = os.path.abspath(__file__)


def redness(prompts, images):
    """A callable image reward in the f(prompts, images) convention: mean red minus mean blue, in [-1, 1]."""
    return [
        float((np.asarray(im, dtype=np.float32)[..., 0] - np.asarray(im, dtype=np.float32)[..., 2]).mean() / 255)
        for im in images
    ]


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    return D.prepare_demo(str(tmp_path_factory.mktemp("sd") / "model"))


def demo_cfg(demo_model, out_dir, *extra):
    """The demo's configuration (as `python diffusion.py` resolves it), on the prepared tiny model."""
    cfg = D.parse(["--demo_dir", demo_model, "--out_dir", str(out_dir), "--device", "cpu", *extra])
    cfg.model = demo_model
    return cfg


@pytest.fixture(scope="session")
def two_stages(demo_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    cfg = demo_cfg(demo_model, out, "--stages", "2")
    init = {k: v.clone() for k, v in D.load_sd(cfg, torch.device("cpu")).unet.state_dict().items() if "lora" in k}
    rows, sd = D.run(cfg)
    return cfg, rows, sd, init, out


def test_the_group_keeps_these_tests_on_one_worker(request):
    """Under the README's `-n 2 --dist loadgroup`, pytest-xdist sends a group's tests to one worker by a suffix of
    their node ids. pytest 9.2 ignores that suffix and xdist 3.8 then spreads the group, so each worker builds the
    demo model and runs the two stages (about two minutes more); requirements.txt caps pytest below 9.2."""
    if request.config.getoption("loadgroup", False):  # set on each worker of --dist loadgroup
        assert request.node.nodeid.endswith("@diffusion"), request.node.nodeid


def test_two_stages_raise_the_reward_and_write_images(two_stages):
    cfg, rows, sd, _, out = two_stages
    assert [r["stage"] for r in rows] == [0, 1, 2]
    ev = [r["eval_reward_mean"] for r in rows]
    # measured (2-core CPU, 2026-12-02, one thread as under -n 2, requirements.lock): ev 0.437, 0.563, 0.554, the
    # samples 0.446 -> 0.586; with AVX2 kernels (ATEN_CPU_CAPABILITY=avx2) ev 0.478, 0.536, 0.524, the samples
    # 0.486 -> 0.562: the eval bar holds there by 0.016 only (brightness in [0, 1])
    assert ev[2] >= ev[0] + 0.03 and ev[1] > ev[0], ev
    assert rows[2]["reward_mean"] > rows[1]["reward_mean"] + 0.03  # the stage's own samples got brighter too
    assert all(r["selected_reward_mean"] > r["reward_mean"] + 0.1 for r in rows[1:])  # the best of K=8 is kept
    assert {"config.json", "metrics.jsonl", "reward_curve.png"} <= set(os.listdir(out))
    assert json.loads((out / "config.json").read_text())["K"] == 8
    assert Image.open(out / "stage_0000" / "eval_grid.png").size == (4 * 32, 10 * 32)  # eval_images × prompts
    for t in (1, 2):
        d = out / f"stage_{t:04d}"
        assert Image.open(d / "grid.png").size == (8 * 32, 20 * 32)  # K columns, a row per prompt of the stage
        kept = [json.loads(line) for line in (d / "kept.jsonl").read_text().splitlines()]
        assert len(kept) == rows[t]["n_selected"] == 20 and len(os.listdir(d / "kept")) == 20
        for row in kept:  # the saved PNG is the image that was scored, and it was the best of its prompt's K
            assert row["reward"] == max(row["rewards"]) and row["rewards"][row["k"]] == row["reward"]
            assert D.brightness(None, [Image.open(d / row["image"])])[0] == pytest.approx(row["reward"], abs=1e-6)


def test_only_the_lora_weights_change(two_stages, demo_model):
    _, _, sd, init, out = two_stages
    for part, model, file in [
        ("unet", sd.unet, "diffusion_pytorch_model.safetensors"),
        ("vae", sd.vae, "diffusion_pytorch_model.safetensors"),
        ("text_encoder", sd.text, "model.safetensors"),
    ]:
        saved = load_file(os.path.join(demo_model, part, file))
        now = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora" not in k}
        assert set(now) == set(saved) and all(torch.equal(now[k], saved[k]) for k in saved), part
    lora = {k: v for k, v in sd.unet.state_dict().items() if "lora" in k}
    assert len(lora) == len(init) == 64 and all(not torch.equal(lora[k], init[k]) for k in init)
    assert all(p.requires_grad == ("lora" in n) for n, p in sd.unet.named_parameters())
    a1, a2 = (load_file(out / f"stage_000{t}" / "pytorch_lora_weights.safetensors") for t in (1, 2))
    assert a1.keys() == a2.keys() and any(not torch.equal(a1[k], a2[k]) for k in a1)  # stage 2 trained further


def test_saved_adapters_load_in_diffusers_and_give_the_same_images(two_stages, demo_model):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    cfg, _, sd, _, out = two_stages
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(demo_model, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(demo_model, subfolder="text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(demo_model, subfolder="tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(demo_model, subfolder="unet"),
        scheduler=DDIMScheduler.from_pretrained(demo_model, subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_lora_weights(str(out / "stage_0002"))
    assert pipe.unet.peft_config["default_0"].lora_alpha == cfg.lora_alpha
    other = SimpleNamespace(
        tok=pipe.tokenizer,
        text=pipe.text_encoder,
        vae=pipe.vae,
        unet=pipe.unet.eval(),
        sched=pipe.scheduler,
        factor=sd.factor,
        device=sd.device,
        amp=sd.amp,
    )
    prompts, seeds = ["cat", "ship", "frog"], [1, 2, 3]
    mine, theirs = D.sample(sd, prompts, seeds, cfg), D.sample(other, prompts, seeds, cfg)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(mine, theirs))
    pipe.unet.disable_adapters()  # and the adapters matter: without them the images differ
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(mine, D.sample(other, prompts, seeds, cfg))
    )


def test_sampling_repeats_from_the_seed_in_any_batch(two_stages):
    cfg, _, sd, _, _ = two_stages
    together = D.sample(sd, ["cat", "dog", "cat"], [7, 8, 9], cfg)
    alone = D.sample(sd, ["cat"], [9], cfg)[0]
    assert np.abs(np.asarray(together[2], dtype=int) - np.asarray(alone, dtype=int)).max() <= 1  # batch-size rounding
    assert not np.array_equal(np.asarray(together[0]), np.asarray(together[2]))  # another seed, another image


def test_ranking_keeps_the_right_images():
    nan = float("nan")
    r = torch.tensor([[0.1, 0.9, 0.2], [0.3, nan, 0.35], [0.95, 0.92, 0.0], [nan, nan, nan]])
    gen = torch.Generator().manual_seed(0)
    assert D.rank(r, "local", gen) == [1, 5, 6]  # the best of each prompt; the all-NaN prompt keeps none
    assert D.rank(r, "global", gen) == [1, 5, 6, 7]  # the top b = 4 of all 12: prompt 2 gives two
    for _ in range(20):  # random: one valid image per prompt that has one
        picks = D.rank(r, "random", gen)
        assert [i // 3 for i in picks] == [0, 1, 2] and 4 not in picks


def test_offline_and_callable_rewards(tmp_path):
    flat, noisy = (
        Image.new("RGB", (64, 64), (200, 40, 40)),
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)),
    )
    assert D.brightness(None, [Image.new("RGB", (8, 8), "white"), Image.new("RGB", (8, 8), "black")]) == [1.0, 0.0]
    small, big = D.jpeg_incompressibility(None, [flat, noisy])
    assert 0 < small < big and D.jpeg_compressibility(None, [flat, noisy]) == [-small, -big]
    cfg = D.DiffusionConfig(reward=["brightness", f"{HERE}:redness"], reward_weights="1,2", out_dir=str(tmp_path))
    fn = D.load_image_rewards(cfg, "cpu")
    got = fn(["a", "b"], [flat, noisy])
    want = [b + 2 * r for b, r in zip(D.brightness(None, [flat, noisy]), redness(None, [flat, noisy]))]
    assert got == pytest.approx(want) and set(fn.stats) == {"reward_0_mean", "reward_1_mean"}


def tiny_clip(path):
    from transformers import ByT5Tokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    tok = ByT5Tokenizer()
    CLIPModel(
        CLIPConfig(
            text_config=dict(
                vocab_size=len(tok),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=32,
                eos_token_id=tok.eos_token_id,
            ),
            vision_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            ),
            projection_dim=8,
        )
    ).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


def test_aesthetic_head_linear_and_mlp_and_clip_score(tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    clip = tiny_clip(tmp_path / "clip")
    images = [Image.new("RGB", (40, 48), c) for c in ["red", "navy", "white"]] + [
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    ]
    model = CLIPModel.from_pretrained(clip).eval()
    px = AutoImageProcessor.from_pretrained(clip)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        emb = torch.nn.functional.normalize(
            model.visual_projection(model.vision_model(pixel_values=px).pooler_output), dim=-1
        )
    torch.manual_seed(1)
    linear = torch.nn.Linear(8, 1)  # sa_0_4_vit_l_14_linear.pth's format (768 inputs there)
    torch.save(linear.state_dict(), tmp_path / "linear.pth")
    mlp = torch.nn.Sequential(
        torch.nn.Linear(8, 6),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(6, 4),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(4, 1),
    ).eval()  # the improved predictor's shape, smaller
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, tmp_path / "mlp.pth")
    with torch.no_grad():
        for head, net in [("linear.pth", linear), ("mlp.pth", mlp)]:
            cfg = D.DiffusionConfig(
                reward=["aesthetic"], clip_model=clip, aesthetic_head=str(tmp_path / head), reward_batch_size=3
            )
            got = D.load_image_rewards(cfg, "cpu")(["x"] * 4, images)
            assert got == pytest.approx(net(emb).flatten().tolist(), abs=1e-5), head
        cfg = D.DiffusionConfig(reward=["clip_score"], clip_model=clip, reward_batch_size=3)
        prompts = ["a red square", "navy", "white", "noise"]
        got = D.load_image_rewards(cfg, "cpu")(prompts, images)
        o = model(pixel_values=px, **AutoTokenizer.from_pretrained(clip)(prompts, padding=True, return_tensors="pt"))
    assert got == pytest.approx((o.image_embeds * o.text_embeds).sum(-1).tolist(), abs=1e-5)
    assert all(-1 <= v <= 1 for v in got) and len(set(got)) == 4
    torch.save({"weight": torch.zeros(2, 8), "bias": torch.zeros(2)}, tmp_path / "bad.pth")
    with pytest.raises(SystemExit, match="ending in 1 output"):
        D.linear_head(str(tmp_path / "bad.pth"))


def test_bf16_stores_the_frozen_weights_in_bf16_and_trains_fp32_adapters(demo_model, tmp_path):
    from safetensors import safe_open

    cfg = demo_cfg(
        demo_model,
        tmp_path / "b",
        "--stages",
        "1",
        "--bf16",
        "--prompts_per_stage",
        "4",
        "--K",
        "2",
        "--eval_images",
        "1",
        "--lora_alpha",
        "16",
    )
    rows, sd = D.run(cfg)
    with safe_open(str(tmp_path / "b" / "stage_0001" / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])  # alpha ≠ rank survives into the LoRA file
    assert (meta["unet.r"], meta["unet.lora_alpha"]) == (8, 16)
    assert rows[1]["train_loss"] > 0 and np.isfinite(rows[1]["eval_reward_mean"])
    dtypes = {n: p.dtype for n, p in sd.unet.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora" not in n} == {torch.bfloat16}
    assert next(sd.vae.parameters()).dtype == torch.bfloat16


def fails(argv, *needles):
    with pytest.raises(SystemExit) as e:
        D.main(argv)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_bad_input_stops_before_any_model_is_built(tmp_path):
    demo = tmp_path / "never_built"
    base = ["--demo_dir", str(demo), "--out_dir", str(tmp_path / "o")]
    fails(base + ["--K", "0"], "--K")
    fails(base + ["--reward", "beauty"], "--reward 'beauty'", "aesthetic", "file.py:function")
    fails(base + ["--reward", "aesthetic"], "--aesthetic_head")
    fails(base + ["--ranking", "best"], "--ranking")
    fails(base + ["--resolution", "30"], "--resolution", "multiple of 8")
    fails(
        base + ["--reward", "brightness", "--reward", "jpeg_compressibility", "--reward_weights", "1"],
        "--reward_weights",
    )
    fails(base + ["--prompts", str(tmp_path / "missing.txt")], "--prompts", "no such file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    fails(["--demo_dir", str(demo), "--out_dir", str(tmp_path / "full")], "not empty")
    assert not demo.exists()  # every check ran before the demo model was built
    (tmp_path / "empty.txt").write_text("\n  \n")
    fails(
        [
            "--model",
            str(tmp_path / "no_model"),
            "--prompts",
            str(tmp_path / "empty.txt"),
            "--reward",
            "brightness",
            "--out_dir",
            str(tmp_path / "e"),
        ],
        "--prompts",
        "no prompts",
    )
    fails(
        ["--model", str(tmp_path / "no_model"), "--reward", "brightness", "--out_dir", str(tmp_path / "m")],
        "--model",
        "no_model",
    )
    assert not (tmp_path / "e").exists() and not (tmp_path / "m").exists()  # no half-made run directory to clear


def test_demo_captions_show_every_name_and_leave_one_in_ten_empty():
    """The demo's pretraining captions: all ten CIFAR-10 names ("airplane" too), about one in ten empty (SD's recipe
    for classifier-free guidance) whatever the class, and the empty ones spread through the list."""
    captions = D.demo_captions(960)
    assert len(captions) == 960 and set(captions) == set(D.CIFAR10) | {""}
    assert captions.count("") == pytest.approx(96, abs=10)  # ≈ 10% empty
    counts = {name: captions.count(name) for name in D.CIFAR10}
    assert min(counts.values()) >= 0.8 * 96, counts  # no class loses over a fifth of its 96 images to the empty one
    for s in range(0, 900, 100):  # not bunched: every run of 100 images has about ten empty
        assert 5 <= captions[s : s + 100].count("") <= 15, s
    assert set(D.demo_captions(20)) == set(D.CIFAR10) | {""}  # a short list shows every name too


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a red car\n\n  a blue boat  \n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a cat"}) + "\n" + json.dumps({"prompt": "a dog"}) + "\n")
    assert D.load_prompt_list(D.DiffusionConfig(prompts=str(tmp_path / "p.txt"))) == ["a red car", "a blue boat"]
    assert D.load_prompt_list(D.DiffusionConfig(prompts=str(tmp_path / "p.jsonl"))) == ["a cat", "a dog"]
    assert D.load_prompt_list(D.DiffusionConfig()) == D.CIFAR10 and len(D.CIFAR10) == 10


def save_tiny_sd(path, prediction_type):
    """A random SD-layout checkpoint at toy size (no training: for checks that need the parts, not good images)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = ByT5Tokenizer()
    parts = dict(
        tokenizer=tok,
        text_encoder=CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tok),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                max_position_embeddings=16,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        ),
        unet=UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            attention_head_dim=8,
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ),
        vae=AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
        ),
        scheduler=DDIMScheduler(prediction_type=prediction_type),
    )
    for name, part in parts.items():
        part.save_pretrained(os.path.join(path, name))
    return str(path)


def test_a_scheduler_predicting_neither_noise_nor_v_is_refused_before_training(tmp_path):
    model = save_tiny_sd(tmp_path / "sd", "sample")
    argv = ["--model", model, "--reward", "brightness", "--resolution", "32", "--out_dir", str(tmp_path / "o")]
    fails(argv, "prediction_type", "'sample'", "epsilon", "v_prediction")
    assert not (tmp_path / "o").exists()  # stopped before the run directory, let alone any sampling or training


@pytest.mark.parametrize("kind", ["v_prediction", "epsilon"])
def test_training_target_is_v_or_the_noise(tmp_path, monkeypatch, kind):
    """finetune regresses the UNet's output onto get_velocity(z0, noise, t) for a v-prediction scheduler and onto
    the noise for an epsilon one, with the (z0, noise, t) it noised the latents with."""
    cfg = D.DiffusionConfig(
        model=save_tiny_sd(tmp_path / "sd", kind), resolution=32, epochs=1, train_batch_size=2, out_dir=str(tmp_path)
    )
    sd = D.load_sd(cfg, torch.device("cpu"))
    noised, targets = [], []
    add_noise = sd.sched.add_noise
    sd.sched.add_noise = lambda z0, noise, t: noised.append((z0, noise, t)) or add_noise(z0, noise, t)
    mse = D.F.mse_loss
    monkeypatch.setattr(D.F, "mse_loss", lambda pred, target: targets.append(target) or mse(pred, target))
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "navy")]
    D.finetune(sd, images, ["cat", "ship"], cfg, seed=0)
    ((z0, noise, t),), (target,) = noised, targets  # one batch: one noising, one loss
    want = sd.sched.get_velocity(z0, noise, t) if kind == "v_prediction" else noise
    assert torch.equal(target, want) and not torch.equal(sd.sched.get_velocity(z0, noise, t), noise)


def test_no_eval_images_runs_to_the_end(demo_model, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["--demo_dir", demo_model, "--out_dir", str(out), "--device", "cpu", "--eval_images", "0"]
    rows = D.main(argv + ["--stages", "1", "--prompts_per_stage", "2", "--K", "2", "--steps", "2", "--epochs", "1"])
    assert [r["stage"] for r in rows] == [0, 1] and not any(k.startswith("eval_") for r in rows for k in r)
    assert rows[1]["n_selected"] == 2 and rows[1]["train_loss"] > 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("stage")]
    assert len(lines) == 2 and not any("eval reward" in line for line in lines), lines
    assert (out / "metrics.jsonl").exists() and not (out / "stage_0001" / "eval_grid.png").exists()


def test_global_ranking_keeps_only_valid_images_when_fewer_than_b():
    nan = float("nan")
    r = torch.tensor([[nan, 0.5, nan], [nan, nan, nan], [0.2, nan, nan]])  # b = 3 prompts, 2 valid images
    assert D.rank(r, "global", torch.Generator().manual_seed(0)) == [1, 6]
