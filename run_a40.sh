#!/usr/bin/env bash
# The paper's LLM run (RAFT, Dong et al. 2023, Table 3) on one node of 8×A40 (48 GB each).
#
#   MODEL=/path/to/llama-7b-sft bash run_a40.sh            # K = 8; K=32 for the main table's RAFT-K32 row
#   DRY_RUN=1 MODEL=x bash run_a40.sh                      # check and print the resolved configuration, run nothing
#   PLAN=0 MODEL=... bash run_a40.sh                       # launch without planning first (see below)
#
# Before torchrun starts, plan.py rehearses one stage of this very command on fake tensors (configs only, no GPU):
# memory per phase and rank against the A40's 48 GB, and an estimated time. When a phase cannot fit, the script
# stops there with the plan's verdict and the first change that fits, before any GPU is touched (exit 3). PLAN=0
# skips it; PLAN_ARGS adds plan.py options (e.g. "--gpu_memory_gb 40").
#
# MODEL is the paper's starting point: LLaMA-7B after 1 epoch of SFT on HH-RLHF's chosen responses, made with
#   torchrun --nproc_per_node 8 sft.py --sft_field chosen --model huggyllama/llama-7b \
#       --dataset Dahoas/full-hh-rlhf --epochs 1 --bf16 --out_dir runs/llama7b-sft
# Every choice below is an environment variable (defaults are the paper's): MODEL REWARD DATASET K B LAMBDA LR EPOCHS
# MAX_NEW STAGES MODE NPROC OUT GEN_BATCH MICRO TRAIN_BATCH EVAL_PROMPTS; EXTRA is appended to raft.py's arguments.
#
# Memory per GPU, planned by plan.py (activations and an allowance included; docs/planning.md; not measured):
#   MODE=full (the paper: full fine-tuning, bf16 compute): FSDP2 shards the fp32 master weights, gradients and AdamW
#     states (3.4 + 6.7 GB at the step); sampling gathers the bf16 weights once per phase (13.5 GB) and adds the KV
#     cache of GEN_BATCH × K sequences; the reward model (Open-LLaMA-3B, bf16, 6.6 GB) sits on every GPU unless
#     --offload_reward is in EXTRA. K=8: 33.4 GB at the largest phase (sampling), allowance included; training
#     32.9. K=32: the cache is 18.3 GB and sampling needs 47.7 of 48 GB: use EXTRA=--offload_reward (40.4 GB).
#   MODE=lora: a frozen bf16 base (13.5 GB) per GPU + LoRA adapters (DDP) — for 40–48 GB cards without sharding;
#     training at MICRO rows of 384 tokens needs checkpointing on one 48 GB card (EXTRA=--gradient_checkpointing).
#   MODE=8bit: a frozen int8 base + LoRA adapters + gradient checkpointing, the reward model in int8, bf16 compute
#     and KV cache — for 24 GB cards (the README's one-GPU command: 19.2 GB planned with --micro_batch_size 2);
#     8-bit generation is slow (reported ≈5× slower than bf16; EXTRA=--gen_dequantized samples from a bf16 copy
#     when ≈13.5 GB more fits).
# Time: the paper reports ≈5 h for a K = 8 run on 8×A40; plan.py estimates 19 min a stage (K=8) and 25 (K=32) from
# counted FLOPs and bytes, not measured here.
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:?set MODEL to the SFT model (path or hub id), see the header}
REWARD=${REWARD:-weqweasdas/hh_rlhf_rm_open_llama_3b}
DATASET=${DATASET:-Dahoas/full-hh-rlhf}
K=${K:-8}                    # paper: 8 / 16 / 32
B=${B:-2048}                 # prompts per stage (paper: 2048)
LAMBDA=${LAMBDA:-1.0}        # sampling temperature (paper: 1.0)
LR=${LR:-2e-5}               # paper: 2e-5, linear decay
EPOCHS=${EPOCHS:-2}          # paper: 2 per stage
MAX_NEW=${MAX_NEW:-128}      # paper: 128 new tokens
STAGES=${STAGES:-12}           # paper: ≈10–18 stages, until the reward stops rising
EVAL_PROMPTS=${EVAL_PROMPTS:-4608}  # paper: 4,608 held-out test prompts
MODE=${MODE:-full}           # full | lora | 8bit
NPROC=${NPROC:-8}
GEN_BATCH=${GEN_BATCH:-8}    # prompts per generate call per GPU (× K sequences): sized for the KV cache of a 7B
MICRO=${MICRO:-4}            # rows per forward pass per GPU
TRAIN_BATCH=${TRAIN_BATCH:-32}
OUT=${OUT:-runs/a40_k${K}_${MODE}}
EXTRA=${EXTRA:-}

case $MODE in
  full) MODE_ARGS="--bf16" ;;
  lora) MODE_ARGS="--bf16 --lora_r 16" ;;
  8bit) MODE_ARGS="--load_in_8bit --lora_r 16 --gradient_checkpointing --bf16 --reward_load_in_8bit" ;;
  *) echo "MODE=$MODE: choose full, lora or 8bit"; exit 2 ;;
esac

# shellcheck disable=SC2086  # MODE_ARGS and EXTRA are lists of words
ARGS=(--model "$MODEL" --reward "$REWARD" --dataset "$DATASET" --eval_split test --eval_prompts "$EVAL_PROMPTS"
      --prompts_per_stage "$B" --K "$K" --temperature "$LAMBDA" --top_k 0 --top_p 1.0 --max_new_tokens "$MAX_NEW"
      --lr "$LR" --epochs "$EPOCHS" --stages "$STAGES" --gen_batch_size "$GEN_BATCH"
      --micro_batch_size "$MICRO" --train_batch_size "$TRAIN_BATCH" --out_dir "$OUT" $MODE_ARGS $EXTRA)

if [ "${DRY_RUN:-0}" = 1 ]; then
  # one process that believes it is rank 0 of NPROC: the per-rank checks run, nothing is loaded
  WORLD_SIZE=$NPROC RANK=0 exec "${PYTHON:-python}" raft.py "${ARGS[@]}" --dry_run
fi
if [ "${PLAN:-1}" != 0 ]; then
  # shellcheck disable=SC2086  # PLAN_ARGS is a list of words
  "${PYTHON:-python}" plan.py "${ARGS[@]}" --nproc_per_node "$NPROC" --gpu A40 ${PLAN_ARGS:-} || {
    rc=$?
    [ "$rc" = 3 ] && echo "run_a40.sh: the plan above says a phase does not fit; nothing was launched (PLAN=0 skips the plan)"
    exit "$rc"
  }
fi
exec torchrun --standalone --nproc_per_node "$NPROC" raft.py "${ARGS[@]}" --resume
