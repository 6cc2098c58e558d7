#!/usr/bin/env bash
# Every GPU measurement the kit owes, in one run of under 9 minutes on one H100 / H200, appended to BENCHMARKS.md as
# a dated section (device, date, library versions, the command, each step's command and table):
#   generation (kit fastgen / plain-HF baselines, and the kit's vLLM backend when `import vllm` works, each with
#   its greedy tokens checked against model.generate's) at the 1.5B and 7B shapes, one RAFT stage (1.5B) with each
#   sampling backend, full and LoRA (fastgen, and --gen_backend vllm when vLLM imports), reward scoring (3B reward
#   shape), SFT (1.5B), one RAFT stage in each memory mode (8-bit base + LoRA when bitsandbytes imports, bf16 base
#   + LoRA, full bf16), one diffusion.py stage (SD 1.5 shapes, needs diffusers), one stage through torchrun at
#   world size 1 per engine (DDP for LoRA, FSDP2 for full; NCCL on a GPU), and the kit's RL step against TRL's
#   GRPOTrainer (bench_peer.py, needs trl and datasets; with vLLM also both sides' vLLM modes). The vLLM steps come
#   first: with vLLM installed, what the budget leaves out is listed, for a second run with BENCH_STEPS.
#
#   bash bench_gpu.sh                        # on the GPU machine
#   BENCH_SHAPE=tiny bash bench_gpu.sh       # the same steps at the tiny shape on a CPU (tests/test_bench.py)
#
# Environment: BENCH_OUT (the markdown file appended to; default BENCHMARKS.md), BENCH_STEPS (a comma-separated
# subset of the step names below; default all), BENCH_BUDGET (seconds for all steps; default 500: a step that
# would not fit is skipped and reported, so the run ends in time), PYTHON (default python).
# Each bench.py call runs under `timeout`; a step that fails or times out is reported and the next one runs.
# Before a stage step (--phase stage), plan.py rehearses that stage on fake tensors against the GPU's memory
# (nvidia-smi's total, or PLAN_GPU_GB); a stage the plan says cannot fit is skipped and reported with the plan's
# verdict instead of running out of memory. PLAN=0 skips the planning.
set -uo pipefail
cd "$(dirname "$0")"
OUT_MD=${BENCH_OUT:-BENCHMARKS.md}
SHAPE=${BENCH_SHAPE:-gpu}
PY=${PYTHON:-python}
BUDGET=${BENCH_BUDGET:-500}
COMMAND="$(printf '%q ' "$0" "$@")"
[ "$SHAPE" = tiny ] && COMMAND="BENCH_SHAPE=tiny $COMMAND"
case $SHAPE in gpu | tiny) ;; *) echo "bench_gpu.sh: BENCH_SHAPE=$SHAPE: use gpu (default) or tiny" >&2; exit 2 ;; esac

# One python start checks every import the steps need (each start costs seconds): "name version", "-" if it fails.
PROBE=$("$PY" - <<'EOF' 2>/dev/null
import importlib

for name in ("torch", "transformers", "peft", "bitsandbytes", "vllm", "diffusers", "trl"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception:  # not installed, or installed but broken (a CUDA-only build on a CPU, a version clash)
        print(name, "-")
import torch

print("cuda", int(torch.cuda.is_available()))
EOF
)
probe() { awk -v n="$1" '$1 == n { print $2 }' <<<"$PROBE"; }
has() { [ -n "$(probe "$1")" ] && [ "$(probe "$1")" != - ]; }
version() { if has "$1"; then probe "$1"; else echo "not importable"; fi; }

has torch || { echo "bench_gpu.sh: $PY cannot import torch" >&2; exit 2; }
CUDA=$(probe cuda)
if [ "$SHAPE" = gpu ] && [ "$CUDA" != 1 ]; then
  echo "bench_gpu.sh: no CUDA device (torch.cuda.is_available() is False); BENCH_SHAPE=tiny runs the steps on a CPU" >&2
  exit 2
fi
if [ "$CUDA" = 1 ]; then
  DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  [ -n "$DEVICE" ] || DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name())")
else
  DEVICE="CPU ($(nproc) cores, no GPU)"
fi
HAS_VLLM=0; [ "$CUDA" = 1 ] && has vllm && HAS_VLLM=1
GPU_GB=${PLAN_GPU_GB:-}  # the memory plan.py checks a stage against: the GPU's, in GB (1e9 bytes)
if [ -z "$GPU_GB" ] && [ "$CUDA" = 1 ]; then
  GPU_GB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1 | awk '{ printf "%.1f", $1 * 1048576 / 1e9 }')
fi

# Shapes: the kit's targets on the GPU; the tiny shape (seconds each) on a CPU. Stage steps: b prompts, K=8.
if [ "$SHAPE" = gpu ]; then
  S1=1b; S7=7b; RM=3b; SD=sd15; STAGE_B=64; MEM_B=32; GEN_B=8
  PEER="--prompts 64 --K 8 --max_new_tokens 128 --steps 3"
else
  S1=tiny; S7=tiny; RM=tiny; SD=tiny; STAGE_B=8; MEM_B=8; GEN_B=8
  PEER="--prompts 4 --K 2 --max_new_tokens 4 --steps 1"
fi
MEM="--shape $S7 --reward_shape $RM --phase stage --prompts $MEM_B --gen_batch_size $GEN_B"
VLLM_FLAG=""; [ "$HAS_VLLM" = 1 ] && VLLM_FLAG=" --vllm"
PEER_SIDES=kit,trl; [ "$HAS_VLLM" = 1 ] && PEER_SIDES=kit,trl,kit-vllm,trl-vllm

# name | seconds at most | what it needs (an importable module, vllm: vLLM on a GPU, or -) | title | command
STEPS=(
  "gen1b|150|-|generation, ${S1} shape|$PY bench.py --shape $S1 --phase generate$VLLM_FLAG"
  "peer|170|trl|the kit's RL step against TRL's GRPOTrainer (bench_peer.py: SmolLM2-135M shape, random weights, bf16; sides $PEER_SIDES)|$PY bench_peer.py --random --bf16 --runs 1 --sides $PEER_SIDES $PEER --out_dir runs/bench_peer_gpu"
  "memfull|60|-|stage, full fine-tuning, bf16 compute (${S1} policy)|$PY bench.py --shape $S1 --phase stage --prompts $STAGE_B"
  "vllmfull|120|vllm|stage, full fine-tuning, --gen_backend vllm (${S1} policy)|$PY bench.py --shape $S1 --phase stage --prompts $STAGE_B --raft_args '--gen_backend vllm'"
  "fastlora|60|-|stage, bf16 base + LoRA, fastgen (${S1} policy)|$PY bench.py --shape $S1 --phase stage --prompts $STAGE_B --raft_args '--lora_r 16'"
  "vllmlora|120|vllm|stage, bf16 base + LoRA, --gen_backend vllm (${S1} policy)|$PY bench.py --shape $S1 --phase stage --prompts $STAGE_B --raft_args '--lora_r 16 --gen_backend vllm'"
  "gen7b|180|-|generation, ${S7} shape|$PY bench.py --shape $S7 --phase generate$VLLM_FLAG"
  "score|45|-|reward scoring, ${RM} reward shape|$PY bench.py --shape $S1 --reward_shape $RM --phase score"
  "train|50|-|SFT, ${S1} shape|$PY bench.py --shape $S1 --phase train"
  "mem8bit|90|bitsandbytes|stage, 8-bit base + LoRA (${S7} policy, ${RM} reward)|$PY bench.py $MEM --raft_args '--load_in_8bit --lora_r 16 --gradient_checkpointing --reward_load_in_8bit'"
  "memlora|60|-|stage, bf16 base + LoRA (${S7} policy, ${RM} reward)|$PY bench.py $MEM --raft_args '--lora_r 16'"
  "diffusion|70|diffusers|diffusion.py stage, ${SD} shapes|$PY bench.py --shape $SD --phase diffusion"
  "memory|30|-|memory per mode, computed (what the stage rows measure)|$PY bench.py --shape $S7 --reward_shape $RM --phase memory --gen_batch_size $GEN_B"
  "nccl_ddp|60|-|stage under torchrun, world size 1: LoRA through DDP (${S1} shape)|$PY -m torch.distributed.run --standalone --nproc_per_node 1 bench.py --shape $S1 --phase stage --prompts $STAGE_B --raft_args '--lora_r 16'"
  "nccl_fsdp|60|-|stage under torchrun, world size 1: full fine-tuning through FSDP2 (${S1} shape)|$PY -m torch.distributed.run --standalone --nproc_per_node 1 bench.py --shape $S1 --phase stage --prompts $STAGE_B"
)

WANT=",${BENCH_STEPS:-all},"
SECTION=$(mktemp)
NOTRUN=$(mktemp)
LOG=$(mktemp)
trap 'rm -f "$SECTION" "$NOTRUN" "$LOG"' EXIT
NO_VLLM=$([ "$CUDA" = 1 ] && echo '`import vllm` failed' || echo 'no GPU')
[ "$HAS_VLLM" = 1 ] || echo "- vLLM rows (gen1b, gen7b): $NO_VLLM" >>"$NOTRUN"
START=$SECONDS
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit need title cmd <<<"$step"
  if [ "$WANT" != ",all," ] && [[ $WANT != *",$name,"* ]]; then
    echo "- $name ($title): not in BENCH_STEPS" >>"$NOTRUN"
    continue
  fi
  if [ "$need" = vllm ] && [ "$HAS_VLLM" != 1 ]; then
    echo "- $name ($title): $NO_VLLM" >>"$NOTRUN"
    continue
  fi
  if [ "$need" != - ] && [ "$need" != vllm ] && ! has "$need"; then
    echo "- $name ($title): \`import $need\` failed" >>"$NOTRUN"
    continue
  fi
  left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then
    echo "- $name ($title): out of the ${BUDGET} s budget" >>"$NOTRUN"
    continue
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  if [[ $cmd == *"--phase stage"* ]] && [ "${PLAN:-1}" != 0 ] && [ -n "$GPU_GB" ]; then
    # the stage's raft.py options and its models' configs from bench.py (nothing runs), then plan.py on them
    pdir=$(mktemp -d)
    launch=""; [[ $cmd == *torch.distributed.run* ]] && launch="--torchrun"
    pargs=$(eval "$PY bench.py ${cmd#*bench.py } --plan_dir $pdir" 2>/dev/null)
    eval "$PY plan.py $pargs --gpu_memory_gb $GPU_GB $launch --find_fix false" >"$LOG" 2>&1
    prc=$?
    rm -rf "$pdir"
    if [ "$prc" = 3 ]; then
      echo "- $name ($title): not run: $(grep '^verdict' "$LOG" | head -1)" >>"$NOTRUN"
      cat "$LOG" >&2
      continue
    fi
  fi
  echo "== $name: $cmd (at most ${limit} s)" >&2
  t0=$SECONDS
  # PYTHONUNBUFFERED: a step killed by its timeout still leaves what it printed in the log
  PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} timeout --kill-after 10 "$limit" bash -c "$cmd" >"$LOG" 2>&1
  rc=$?
  secs=$((SECONDS - t0))
  {
    echo
    echo "### $title"
    echo
    echo "\`$cmd\` (${secs} s, exit $rc)"
    echo
    grep -E '^(device |computed, not measured|note: )' "$LOG"
    echo
    grep -E '^\|' "$LOG"
  } >>"$SECTION"
  if [ "$rc" != 0 ]; then
    why=$([ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "timed out after ${limit} s" || echo "failed (exit $rc): $(grep -v '^\s*$' "$LOG" | tail -1 | cut -c1-200)")
    echo "- $name ($title): $why" >>"$NOTRUN"
  fi
  cat "$LOG" >&2
done

{
  echo
  echo "## $DEVICE, $(date -u +%Y-%m-%d) (bench_gpu.sh)"
  echo
  echo "\`$COMMAND\`: torch $(version torch), transformers $(version transformers), peft $(version peft), bitsandbytes" \
    "$(version bitsandbytes), vllm $(version vllm), diffusers $(version diffusers), trl $(version trl);" \
    "$((SECONDS - START)) s in all."
  cat "$SECTION"
  echo
  echo "### Not run or failed"
  echo
  if [ -s "$NOTRUN" ]; then cat "$NOTRUN"; else echo "(none)"; fi
} >>"$OUT_MD"
echo "bench_gpu.sh: appended a section to $OUT_MD; not run or failed:" >&2
cat "$NOTRUN" >&2
