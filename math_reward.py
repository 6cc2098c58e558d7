"""Rewards that check a response's final answer against the dataset row's `answer`, for reasoning runs:
`--reward math_reward:math_verify` (LaTeX and sympy, by the math-verify package) and `--reward
math_reward:exact_number` (the last number, for GSM8K). Both return 1.0 or 0.0, so --ranking positive keeps every
correct response. Like any reward, they go to raft.py by --reward; leave this file out of a copy that does not use
them. What counts as equal, and why math-verify runs in child processes: docs/reasoning.md. Imports reward.py only.
"""

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from decimal import Decimal

from reward import NUMBER, last_number


def exact_number(prompts: list[str], responses: list[str], answer: list) -> list[float]:
    """1.0 when the last number in the response equals the row's numeric answer (3.50 == 3.5), else 0.0."""
    out = []
    for response, gold in zip(responses, answer):
        g = str(gold).strip().replace(",", "")
        if not NUMBER.fullmatch(g):
            raise SystemExit(f"math_reward:exact_number: the answer {gold!r} is not a number; use "
                             f"math_reward:math_verify for answers that are expressions")  # fmt: skip
        pred = last_number(response)
        out.append(float(pred is not None and Decimal(pred) == Decimal(g)))
    return out


MATH_VERIFY_TIMEOUT = 5.0  # seconds per response; an ordinary answer is checked in milliseconds
MATH_VERIFY_WORKERS = min(4, os.cpu_count() or 1)
# math-verify runs in `python -c` child processes, one response at a time each, and a child that passes the deadline
# is killed (its response scores 0.0) and replaced. Why: math-verify's own timeouts use SIGALRM, which exists only in
# the main thread (in a reward called from a worker thread it is silently off), and sympy can spin inside one C call
# (a big-integer power) that no signal interrupts; only killing a process bounds the time wherever the reward is
# called. Why not multiprocessing: its spawn children re-import the parent's main script (raft.py: torch,
# transformers) and this module (torch), seconds and hundreds of MB each; these children import only math-verify.
# Answers come back one line each on the child's own stdout (the library's prints go to stderr).
_MV_CHILD = r"""
import json, logging, sys
out, sys.stdout = sys.stdout, sys.stderr
logging.disable(logging.WARNING)  # math-verify warns on every call that its own timeouts are off
from math_verify import parse, verify
out.write("ready\n"); out.flush()
for line in sys.stdin:
    gold, response = json.loads(line)
    try:
        ok = verify(parse(gold, parsing_timeout=None), parse(response, parsing_timeout=None), timeout_seconds=None)
    except Exception:
        ok = False
    out.write("1\n" if ok else "0\n"); out.flush()
"""
_mv_idle, _mv_lock = [], threading.Lock()  # idle children, kept between calls; one call at a time uses them


def _mv_start(startup: float = 120.0):
    p = subprocess.Popen([sys.executable, "-c", _MV_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, encoding="utf-8")  # fmt: skip
    if not select.select([p.stdout], [], [], startup)[0] or p.stdout.readline().strip() != "ready":
        p.kill()
        raise SystemExit("math_reward:math_verify: its checking process did not start (see the error above); "
                         "pip install 'math-verify>=0.9'")  # fmt: skip
    return p


def _mv_stop(p):
    p.kill()
    p.wait()


atexit.register(lambda: [_mv_stop(p) for p in _mv_idle])  # reaped at exit, not left to notice their stdin close


def gold_latex(gold) -> str:
    """A gold answer as math-verify reads it: datasets store bare expressions (`1+2x`, `\frac{14}{3}`), of which
    parse() takes only a prefix (`1`) or nothing, so they are wrapped in \boxed{} unless already boxed or in $...$."""
    g = str(gold).strip()
    return g if "\\boxed" in g or "$" in g else "\\boxed{" + g + "}"


def verify_answers(golds: list, responses: list[str], timeout: float | None = None, workers: int | None = None):
    """math-verify's verdict (1.0 or 0.0) on each response against its gold answer, at most `timeout` seconds
    (MATH_VERIFY_TIMEOUT) per response, checked by `workers` (MATH_VERIFY_WORKERS) child processes at once."""
    timeout = MATH_VERIFY_TIMEOUT if timeout is None else timeout
    workers = workers or MATH_VERIFY_WORKERS
    out, todo, busy, late = [0.0] * len(responses), list(range(len(responses)))[::-1], {}, 0
    with _mv_lock:
        try:
            while todo or busy:
                while todo and len(busy) < workers:
                    p = _mv_idle.pop() if _mv_idle else _mv_start()
                    if p.poll() is not None:  # died while idle: replaced, the item stays to do
                        continue
                    i = todo.pop()
                    p.stdin.write(json.dumps([gold_latex(golds[i]), responses[i]]) + "\n")
                    p.stdin.flush()
                    busy[p] = (i, time.monotonic() + timeout)  # the child is idle, so the clock starts now
                wait = max(0.0, min(d for _, d in busy.values()) - time.monotonic())
                ready = select.select([p.stdout for p in busy], [], [], wait)[0]
                for p, (i, deadline) in list(busy.items()):
                    if p.stdout in ready:
                        line = p.stdout.readline().strip()
                        del busy[p]
                        if line in ("0", "1"):
                            out[i] = float(line)
                            _mv_idle.append(p)
                        else:  # the child died on this response (it scores 0.0)
                            _mv_stop(p)
                    elif time.monotonic() >= deadline:
                        del busy[p]
                        _mv_stop(p)
                        late += 1
        finally:  # an interrupt (Ctrl-C, an error) leaves no child spinning on a response
            for p in busy:
                _mv_stop(p)
    if late:
        print(f"math_reward:math_verify: {late} of {len(responses)} responses took over {timeout:g} s to check and "
              f"scored 0.0", flush=True)  # fmt: skip
    return out


def math_verify(prompts: list[str], responses: list[str], answer: list) -> list[float]:
    """1.0 when the response's final answer equals the row's `answer` by math-verify, else 0.0."""
    return verify_answers(answer, responses)
