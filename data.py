"""Prompts for RAFT, and the offline demo's synthetic movie-review corpus.

- `load_prompts(dataset, split, field)` reads a `.jsonl` / `.json` file (a list of objects, or one object per
  line) or, when the path does not exist, an HF dataset by name (`datasets.load_dataset`), and returns the list
  of prompt strings. Rows whose field is missing, not a string, or blank raise a one-line error naming the row.
- `demo_reviews(n, seed)` writes `n` short reviews of mixed sentiment from a small grammar; `demo_prompts` cuts
  the neutral openings of fresh reviews into prompts. The demo (raft.py with no `--model`) first trains a tiny
  Llama on the reviews, then aligns it with RAFT toward positive reviews (VADER sentiment), mirroring the first
  arXiv version of the paper (GPT-2 on IMDB toward positive reviews).
- `train_demo_tokenizer(texts)` trains a small byte-level BPE tokenizer with `tokenizers` (a dependency of
  transformers) and wraps it as a `PreTrainedTokenizerFast`, so it saves and loads like any HF tokenizer.
"""
import json
import os
import random


def load_prompts(dataset: str, split: str = "train", field: str = "prompt") -> list[str]:
    """Return the prompt strings of a local .json/.jsonl file or an HF dataset (by name)."""
    if os.path.exists(dataset):
        with open(dataset, encoding="utf-8") as f:
            text = f.read()
        if dataset.endswith(".jsonl"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
            rows = rows.get(split, rows) if isinstance(rows, dict) else rows
    else:
        try:
            import datasets
            rows = datasets.load_dataset(dataset, split=split)
        except Exception as e:  # the hub or the name is wrong: say so in one line, not a deep traceback
            raise SystemExit(f"--dataset {dataset!r}: not a local file and not loadable from the hub ({e})")
    prompts = []
    for i, row in enumerate(rows):
        value = row.get(field) if isinstance(row, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise SystemExit(f"--dataset {dataset!r} row {i}: field {field!r} is missing, not a string, or empty "
                             f"(got {value!r}); fix the row or pass --prompt_field")
        prompts.append(value)
    if not prompts:
        raise SystemExit(f"--dataset {dataset!r} has no rows")
    return prompts


# ---- the offline demo: a grammar of short movie reviews -------------------------------------------------
# Openers are neutral, so a prompt (the opener) says nothing about the sentiment of what follows. Each review
# leans positive or negative, but mixes in clauses of the other side, so the pretrained model is ambivalent.
_GENRES = ["comedy", "drama", "thriller", "western", "musical", "horror film", "war film", "cartoon", "romance",
           "mystery", "sequel", "remake", "documentary", "space opera", "heist movie", "biopic"]
_THINGS = ["acting", "plot", "script", "music", "ending", "camera work", "dialogue", "cast", "story", "pacing",
           "soundtrack", "lead actor", "villain", "editing", "humor", "score", "set design", "final act"]
_WHEN = ["last night", "on friday", "this weekend", "yesterday", "last week", "on sunday", "after work",
         "on my birthday", "on a rainy day", "at midnight"]
_WHO = ["my sister", "my dad", "my friend", "my wife", "my brother", "my roommate", "my mom", "my neighbor"]
_WHERE = ["at the cinema", "on tv", "on a plane", "at home", "at a festival", "on my laptop", "at the drive-in",
          "in a small theater"]
_TOPICS = ["a small town", "two brothers", "a lost dog", "a bank heist", "a young chef", "an old soldier",
           "a haunted house", "a robot", "a tennis star", "a family farm"]
_OPENERS = ["i watched this {g} {when} and", "{who} and i saw the new {g} {when} and", "i rented this {g} {where} and",
            "this {g} about {topic} came out {when} and", "we went to see this {g} {where} and",
            "{who} picked this {g} {when} and", "the {g} about {topic} is finally here and",
            "i finally caught this {g} {where} and", "after reading the book i saw this {g} {where} and",
            "this is a {g} about {topic} and"]
_POS_ADJ = ["great", "wonderful", "brilliant", "superb", "lovely", "beautiful", "excellent", "charming", "fun",
            "delightful", "clever", "amazing", "fantastic", "moving", "sweet", "strong", "perfect", "good"]
_NEG_ADJ = ["terrible", "awful", "boring", "dull", "weak", "bad", "horrible", "stupid", "painful", "ugly",
            "lame", "dreadful", "annoying", "sad", "poor", "messy", "silly", "tedious"]
_POS_CLAUSES = ["the {t} was {a}", "the {t} is {a} and {a2}", "i loved the {t}", "what a {a} {t}",
                "the {t} made me smile", "the {t} felt {a}", "it was a joy to watch", "i would watch it again",
                "the {t} is really {a}", "everyone enjoyed the {t}", "the {t} deserves praise"]
_NEG_CLAUSES = ["the {t} was {a}", "the {t} is {a} and {a2}", "i hated the {t}", "what a {a} {t}",
                "the {t} made me cringe", "the {t} felt {a}", "it was a waste of time", "i want my money back",
                "the {t} is really {a}", "nobody liked the {t}", "the {t} is a disaster"]
_NEUTRAL_CLAUSES = ["it runs about two hours", "the {t} reminded me of an old {g}", "it was shot in the winter",
                    "the {t} changes halfway through", "we had popcorn", "the theater was full"]
_JOINERS = [". ", ", and ", ". also ", ", but ", ". "]


def _clause(rng, positive):
    if rng.random() < 0.15:
        template = rng.choice(_NEUTRAL_CLAUSES)
    else:
        template = rng.choice(_POS_CLAUSES if positive else _NEG_CLAUSES)
    adjs = _POS_ADJ if positive else _NEG_ADJ
    a, a2 = rng.sample(adjs, 2)
    return template.format(t=rng.choice(_THINGS), a=a, a2=a2, g=rng.choice(_GENRES))


def _review(rng):
    opener = rng.choice(_OPENERS).format(g=rng.choice(_GENRES), when=rng.choice(_WHEN), who=rng.choice(_WHO),
                                         where=rng.choice(_WHERE), topic=rng.choice(_TOPICS))
    leans_positive = rng.random() < 0.5
    clauses = [_clause(rng, leans_positive if rng.random() < 0.75 else not leans_positive)
               for _ in range(rng.randint(2, 3))]
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
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
