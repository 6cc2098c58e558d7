"""The paths that only run on a GPU, tested in their logic on CPU (docs/memory-and-torchrun.md, "Read against the
locked versions"): FSDP2 with a bf16 param_dtype under sampling, FSDP2's device under --device cpu on a machine with
GPUs, a failed CUDA-graph capture, the process group's timeout and device, torch's cached memory before a vLLM engine
wakes, and bitsandbytes' line per int8 matmul. A fake torch.cuda stands in where the CPU build has none."""

import datetime

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dist
import fastgen
import models
import raft
import vllm_gen


@pytest.fixture
def gloo_world_of_one(tmp_path):
    """A one-rank gloo process group in this process (FSDP2 needs one), destroyed after the test."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, eos_token_id=2, pad_token_id=0, bos_token_id=1)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


PROMPTS = [[1, 5, 9, 12], [1, 7], [1, 30, 31, 32, 33, 34]]


def greedy(model, **kw):
    return fastgen.sample(model, PROMPTS, 2, max_new_tokens=6, eos_ids=[], pad_id=0, temperature=0, **kw)


def test_fastgen_samples_an_fsdp2_model_with_a_bf16_param_dtype(gloo_world_of_one):
    """The paper's 8-GPU command (full fine-tuning, --bf16: FSDP2 with MixedPrecisionPolicy(param_dtype=bf16)).
    FSDP2 casts each sharded module's forward kwargs and so rebuilds every dict and list in them; the sampler's
    caches once went into such a copy and the first sampling phase failed. Its tokens are a plain model's with the
    same bf16 weights."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plain = tiny_llama().to(torch.bfloat16)
    sharded = tiny_llama()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in sharded.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(sharded, mp_policy=mp)
    with models.full_weights(sharded):
        out = greedy(sharded)
    models.release(sharded)
    assert out == greedy(plain) and all(len(s) == 6 for row in out for s in row)


def test_fsdp2_shards_on_the_runs_device_not_the_machines_accelerator(gloo_world_of_one, tiny_lm, monkeypatch):
    """Under `torchrun ... --device cpu` on a machine with GPUs, FSDP2's default mesh (torch._C._get_accelerator)
    was a CUDA one, and fully_shard moved the CPU model to a GPU under a gloo group. The mesh is now the run's."""
    monkeypatch.setattr(torch._C, "_get_accelerator", lambda: torch.device("cuda"))  # a machine with GPUs
    model, _ = models.load_policy(raft.Config(model=tiny_lm), torch.device("cpu"), shard=True)
    assert models.fsdp_modules(model) and {p.device.type for p in model.parameters()} == {"cpu"}
    models.release(model)


class FakeCuda:
    """Just enough of torch.cuda for fastgen's capture path: streams that become current in a context, and a
    torch.cuda.graph whose exit fails as torch's does after an invalidated capture (capture_end raises before the
    stream it made current is restored; torch/cuda/graphs.py, graph.__exit__)."""

    def __init__(self):
        self.default = self.Stream()
        self.current = self.default
        self.capture = self.Stream()

    class Stream:
        def wait_stream(self, other):
            pass

    def current_stream(self):
        return self.current

    def set_stream(self, stream):
        self.current = stream

    def stream(self, s):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            prev, self.current = self.current, s
            yield
            self.current = prev

        return ctx()

    def graph(self, g):
        fake = self

        class Capture:
            def __enter__(self):
                self.prev, fake.current = fake.current, fake.capture

            def __exit__(self, *exc):
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

        return Capture()


def test_a_failed_cuda_graph_capture_decodes_eagerly_on_the_callers_stream(monkeypatch, capsys):
    fake = FakeCuda()
    for name in ("Stream", "current_stream", "set_stream", "stream", "graph"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(fastgen, "_graphs_possible", lambda model, device: True)
    model = tiny_llama()
    out = greedy(model, static_shapes=False)
    assert "CUDA-graph capture failed" in capsys.readouterr().out
    assert fake.current is fake.default  # not left on the capture stream
    monkeypatch.setattr(fastgen, "_graphs_possible", lambda model, device: False)
    assert out == greedy(model, static_shapes=False)  # the eager decode after the failure samples what eager does


def test_process_group_binds_the_gpu_and_outwaits_rank_zeros_saves(monkeypatch):
    """NCCL's default timeout is 10 minutes (gloo's 30): rank 0 alone writing a 7B stage or merging LoRA while the
    others wait in a barrier could be killed by the watchdog. device_id binds each rank's GPU for barrier()."""
    calls = []
    monkeypatch.setattr(dist, "DIST", True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **kw: calls.append((a, kw)))
    assert dist.start(torch.device("cuda:3"))
    assert calls == [("set_device", torch.device("cuda:3")),
                     (("nccl",), {"timeout": dist.TIMEOUT, "device_id": torch.device("cuda:3")})]  # fmt: skip
    calls.clear()
    assert dist.start(torch.device("cpu")) and calls == [(("gloo",), {"timeout": dist.TIMEOUT})]
    assert dist.TIMEOUT >= datetime.timedelta(minutes=30) > datetime.timedelta(minutes=10)


def test_torch_cache_is_handed_back_before_a_sleeping_vllm_engine_wakes(monkeypatch):
    """vLLM maps its weights and KV cache with its own allocator; what training freed stays in torch's cache unless
    it is emptied first (TRL does the same before wake_up)."""
    log = []

    class Engine:
        _raft = {"asleep": {"weights", "kv_cache"}}

        def wake_up(self, tags):
            log.append(tuple(tags))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: log.append("empty_cache"))
    engine = Engine()
    vllm_gen.wake(engine, weights_only=True)  # before a push: the weights alone
    vllm_gen.wake(engine)  # after it: the KV cache
    assert log == ["empty_cache", ("weights",), "empty_cache", ("kv_cache",)]


def test_bitsandbytes_int8_matmuls_do_not_flood_the_console(caplog):
    """bitsandbytes 0.50 logs a warning on every int8 matmul whose input is not fp16: seven lines per decoder layer
    and forward pass under --load_in_8bit. quiet_libraries (raft.py, sft.py, demo.py, eval.py) turns it off."""
    import bitsandbytes as bnb

    dist.quiet_libraries()
    # in eval mode, as when sampling (on a GPU training takes this path too, on a CPU another without the warning)
    layer = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False).to("cpu").eval()
    layer(torch.randn(2, 16))
    assert not [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]
