"""The process around the algorithm: who this process is under torchrun, rank-0 printing and progress bars, the few
collectives the loop needs, the device, phase timing, the metrics logger, the test crash hook and how a torchrun
worker ends.

A plain `python raft.py` is rank 0 of 1 and every collective here is then a no-op. Imports no kit module.
"""

import atexit
import contextlib
import datetime
import logging
import os
import signal
import sys
import time

import torch
from tqdm.auto import tqdm

# torchrun sets these; a plain `python raft.py` is rank 0 of 1
RANK = int(os.environ.get("RANK", 0))
WORLD = int(os.environ.get("WORLD_SIZE", 1))
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))
MASTER = RANK == 0  # only rank 0 prints, shows progress bars and writes files
# launched by torchrun, even with one process: DDP / FSDP2 over a process group, the same code path as 8 GPUs
DIST = WORLD > 1 or "TORCHELASTIC_RUN_ID" in os.environ
# how long a collective may wait: rank 0 alone writes each stage (a 7B model in fp32 is 27 GB) and merges LoRA at the
# end while the other ranks wait in a barrier, and NCCL's default of 10 minutes would let its watchdog kill the job
# on a slow or shared disk (gloo's default is 30 minutes)
TIMEOUT = datetime.timedelta(minutes=60)


def print0(*args):
    if MASTER:
        print(*args, flush=True)


def bar(iterable, desc, total=None):
    # disable=None lets tqdm decide: a bar on a terminal, none in a log file; never on other ranks
    return tqdm(iterable, desc=desc, total=total, disable=None if MASTER else True, leave=False, dynamic_ncols=True)


def quiet_libraries():
    """The kit prints its own lines: libraries only speak up about errors (no 'Writing model shards' bars)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # bitsandbytes warns on every int8 matmul whose input is not fp16 (the kit's are bf16 or fp32, cast to fp16
    # inside): seven lines per decoder layer per forward pass
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if "datasets" in sys.modules:
        sys.modules["datasets"].utils.logging.set_verbosity_error()
        sys.modules["datasets"].disable_progress_bars()
    else:  # read when it is imported (a hub dataset): importing it here would cost every process a second
        os.environ.setdefault("DATASETS_VERBOSITY", "error")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def shard(items: list) -> list:
    """This rank's contiguous share of a global list."""
    n = len(items)
    return items[RANK * n // WORLD : (RANK + 1) * n // WORLD]


def gather(items: list) -> list:
    """Every rank's list concatenated in rank order, on every rank."""
    if WORLD == 1:
        return items
    parts = [None] * WORLD
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def barrier():
    if WORLD > 1:
        torch.distributed.barrier()


def pick_device(name: str = "auto") -> torch.device:
    """cuda:LOCAL_RANK when asked for (or available under auto), else the CPU."""
    cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    return torch.device(f"cuda:{LOCAL_RANK}" if cuda else "cpu")


def start(device: torch.device) -> bool:
    """Join torchrun's process group (NCCL between GPUs, gloo on CPUs); True when this call created it."""
    if not DIST or torch.distributed.is_initialized():
        return False
    if device.type != "cuda":
        torch.distributed.init_process_group("gloo", timeout=TIMEOUT)
        return True
    torch.cuda.set_device(device)
    # device_id binds the rank's GPU: barrier() then uses it instead of a guess from the rank (and warns no more)
    torch.distributed.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    return True


def stop(own: bool):
    # every rank reaches the barrier before the group goes, so no rank tears it down under another's last collective
    if own:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def exit_worker():
    """Under torchrun, end the process here, after the atexit handlers but without Python's interpreter shutdown.
    gloo's worker threads free a finished collective's tensors after the caller has moved on; a thread that needs
    the GIL once the interpreter is shutting down is killed by Python 3.11 and aborts the process ("terminate called
    without an active exception", SIGABRT), now and then on a loaded CPU. Call it last: files are closed by now."""
    if DIST:
        atexit._run_exitfuncs()  # what a normal exit runs first: math-verify workers reaped, wandb finished
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def crash_point(phase: str, stage: int):
    """Test hook: RAFT_CRASH_AT=phase@stage (every rank) or phase@stage:rank kills this process here (SIGKILL)."""
    if os.environ.get("RAFT_CRASH_AT") in (f"{phase}@{stage}", f"{phase}@{stage}:{RANK}"):
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def phase(name: str, m: dict, device: torch.device):
    """Seconds of one phase into m["time_<name>"] and, on a GPU, this rank's peak memory into m["peak_gib_<name>"]."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    yield
    m[f"time_{name}"] = time.time() - t0
    if cuda:
        m[f"peak_gib_{name}"] = torch.cuda.max_memory_allocated(device) / 2**30


def make_logger(report_to: str, out_dir: str, config: dict):
    """log(metrics, step) to tensorboard or wandb on rank 0; a no-op elsewhere or with report_to none."""
    if not MASTER or report_to == "none":
        return lambda m, step: None
    if report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        w = SummaryWriter(os.path.join(out_dir, "tensorboard"))

        def log(m, step):
            for k, v in m.items():
                if isinstance(v, (int, float)):
                    w.add_scalar(k, v, step)
            w.flush()  # each stage on disk now: the writer registers no exit hook of its own

        return log
    import wandb

    wandb.init(project="raft", config=config, dir=out_dir)
    return lambda m, step: wandb.log(m, step=step)
