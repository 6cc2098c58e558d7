"""Scripted rewards for the tests, in the `f(prompts, responses) -> list[float]` convention."""


def letters(prompts, responses):
    """Fraction of ASCII letters in the response: a random byte-level model scores ~0.15, so it can rise."""
    return [sum(c.isascii() and c.isalpha() for c in r) / max(len(r), 1) for r in responses]


def wrong_length(prompts, responses):
    return [0.0] * (len(responses) + 1)


def raises(prompts, responses):
    raise RuntimeError("reward server down")


def nan_for_odd(prompts, responses):
    return [float("nan") if i % 2 else 1.0 for i in range(len(responses))]


def letters_logged(prompts, responses):
    """`letters`, and a record of which prompts this rank scored (RAFT_TEST_LOG/rank<RANK>.jsonl)."""
    import json
    import os

    with open(os.path.join(os.environ["RAFT_TEST_LOG"], f"rank{os.environ.get('RANK', '0')}.jsonl"), "a") as f:
        f.write(json.dumps(prompts) + "\n")
    return letters(prompts, responses)


def prompt_length(prompts, responses):
    """Deterministic and independent of the sampled text: longer prompts score higher."""
    return [float(len(p)) for p in prompts]


def length(prompts, responses):
    """Characters in the response: a second reward to combine with `letters`."""
    return [float(len(r)) for r in responses]


def not_numbers(prompts, responses):
    return ["good"] * len(responses)


def letters_scored(prompts, responses):
    """letters, and every (prompt, response, reward) of each call appended as one JSON line to $RAFT_TEST_SCORES."""
    import json
    import os

    rewards = letters(prompts, responses)
    with open(os.environ["RAFT_TEST_SCORES"], "a") as f:
        f.write(json.dumps([prompts, responses, rewards]) + "\n")
    return rewards
