"""The offline arithmetic demo of RAFT for reasoning: pure pieces, no dependency on raft.py.

A tiny character-level Llama is pretrained on two-digit additions "37+45=" -> "82" whose written answers are often
wrong (off by ±1, a slipped ones digit, or ±10, a dropped or doubled carry), so it learns a spread of answers
around the truth: the right one is the most likely sample but far from certain. The reward is 1 when a response's
final number equals the gold answer. RAFT keeping every correct sample then sharpens the model onto the right
answer: held-out pass@1 rises while pass@8 (already near 1) stays about flat.

    probs = problems(5000, seed=1)                   # prompts with gold answers; split into eval / RAFT prompts
    pairs = pretraining_examples(100_000, probs, 0)  # noisy (prompt, response) pairs: train with the prompt masked
    tok = tokenizer(); model = LlamaForCausalLM(model_config(tok))
    PRETRAIN (lr, epochs, batch), RAFT_DEMO (the loop's settings), reward(prompts, responses) for --reward
"""

import math
import random
import re

PROMPT = "{a}+{b}="
# the vocabulary: every character a prompt or response can hold, plus room for a worked format later
CHARS = "0123456789+-=: abcdefghijklmnopqrstuvwxyz"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
# the kinds of slips a noisy answer makes: ±1 (ones digit) and ±10 (carry dropped or added)
OFFSETS = (-10, -1, 1, 10)

# pretraining of the starting model: about 1,560 AdamW steps of 64 pairs (linear decay), the same SFT code as a stage
PRETRAIN = dict(n_examples=100_000, p_wrong=0.6, lr=3e-3, epochs=1, train_batch_size=64, micro_batch_size=64)
# the RAFT demo: raft.py Config fields (ranking "positive" keeps every correct sample). PROVISIONAL: measured with
# seed 1 (2-core CPU sandbox) pass@1 0.326 -> 0.421 and pass@8 0.907 -> 0.904 after 5 stages, short of the +0.2 goal;
# lr 1e-3 was unstable (pass@8 fell to 0.80) and PRETRAIN with 2 epochs at lr 3e-3 diverged (pass@1 0.07)
RAFT_DEMO = dict(
    ranking="positive",
    prompts_per_iter=128,
    K=8,
    temperature=1.0,
    max_new_tokens=8,
    iterations=5,
    lr=3e-4,
    epochs=2,
    train_batch_size=32,
    micro_batch_size=32,
    eval_prompts=128,
    eval_samples=16,  # samples per held-out prompt: pass@1 as their mean reward, pass@8 unbiased
)
N_PROBLEMS = 5000  # distinct problems drawn for eval + RAFT prompts (of the 10,000 with a, b in 0..99)


def problems(n: int, seed: int, hi: int = 99) -> list[dict]:
    """n distinct problems a+b with a, b in 0..hi, in random order: dicts prompt ("37+45=") and answer ("82")."""
    if n > (hi + 1) ** 2:
        raise ValueError(f"only {(hi + 1) ** 2} distinct problems with operands 0..{hi}, asked for {n}")
    rng = random.Random(seed)
    pairs = rng.sample(range((hi + 1) ** 2), n)  # distinct without rejection loops
    return [
        {"prompt": PROMPT.format(a=i // (hi + 1), b=i % (hi + 1)), "answer": str(sum(divmod(i, hi + 1)))} for i in pairs
    ]


def noisy_answer(answer: str, p_wrong: float, rng: random.Random) -> str:
    """The gold answer, or with probability p_wrong the answer with one slip from OFFSETS (never negative)."""
    x = int(answer)
    if rng.random() >= p_wrong:
        return answer
    slips = [d for d in OFFSETS if x + d >= 0]  # "-1" would teach a sign the prompts never need
    return str(x + rng.choice(slips))


def pretraining_examples(n: int, probs: list[dict], seed: int, p_wrong: float = PRETRAIN["p_wrong"]) -> list[dict]:
    """n pretraining pairs (prompt, response) drawn with replacement from probs, each answer wrong with
    probability p_wrong. Train the response (and EOS) only: the operands are random and would only add noise."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = probs[rng.randrange(len(probs))]
        out.append({"prompt": p["prompt"], "response": noisy_answer(p["answer"], p_wrong, rng)})
    return out


def extract_answer(response: str) -> str | None:
    """The final answer of a response: the last integer in it, normalised ("082" -> "82"); None if there is none."""
    nums = re.findall(r"-?\d+", response)
    return str(int(nums[-1])) if nums else None


def gold_answer(prompt: str) -> str | None:
    """The true answer of a prompt "a+b=" (None for any other text), so the reward needs no side table."""
    m = re.fullmatch(r"\s*(\d+)\s*\+\s*(\d+)\s*=\s*", prompt)
    return str(int(m[1]) + int(m[2])) if m else None


def reward(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 when the response's final answer equals the prompt's true answer, else 0.0 (raft.py --reward)."""
    return [
        float(gold_answer(p) is not None and extract_answer(r) == gold_answer(p)) for p, r in zip(prompts, responses)
    ]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def tokenizer():
    """A character-level tokenizer (one token per digit, so numbers split the same way everywhere) with <s> put in
    front of every text, </s>, <pad> and <unk>; a transformers tokenizer that saves and loads like any other."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + tuple(CHARS))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: characters only
    tok.decoder = decoders.Fuse()  # join the characters back without spaces between them
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def model_config(tok):
    """The tiny Llama (≈0.43M parameters): the review demo's shape with a context fitting prompt + max_new_tokens."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
