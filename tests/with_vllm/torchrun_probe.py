"""Launched by tests/with_vllm/test_vllm_loop.py under `torchrun --nproc_per_node N`: raft.py's run, and each rank
describes its vLLM engine in --out_dir (engine<RANK>.json: the rank and local rank vLLM's worker took, which on a
GPU pick its device and its compile-cache directory, and the executor backend)."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import raft  # noqa: E402
import vllm_gen  # noqa: E402

make_engine = vllm_gen.make_engine


def described(*args, **kwargs):
    llm = make_engine(*args, **kwargs)
    worker = vllm_gen._driver_worker(llm)
    backend = llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
    info = {"rank": worker.rank, "local_rank": worker.local_rank, "backend": backend}
    with open(os.path.join(raft.parse(sys.argv[1:]).out_dir, f"engine{raft.RANK}.json"), "w") as f:
        json.dump(info, f)
    return llm


vllm_gen.make_engine = described  # start_engine looks it up at call time
raft.main(sys.argv[1:])
raft.dist.exit_worker()
