#!/usr/bin/env bash
# The paper's ablations in miniature, on the offline demo (2-core CPU, ≈1–3 min per ablation and seed set):
#   bash ablate.sh k | temperature | kl | ranking | distill | finetune_from | minimalist | all
# Every setting runs once per seed (SEEDS, default "1 2 3"); `python eval.py --sweep DIR` then prints, per setting,
# the mean ± std over seeds of the last stage's held-out reward, its gain over stage 0, distinct-2 and KL to the
# start. Runs are resumable: a finished run (marked by SETTING__s<seed>.done) is skipped, a cut-off one continues
# (--resume).
# Environment: SEEDS, OUT (default runs/ablate), PYTHON, SCRIPT (default demo.py; raft.py for your own model, except
# in `minimalist`, which always runs the arithmetic demo) and
# RAFT_ARGS (extra arguments for every run; with SCRIPT=raft.py your --model/--dataset/--reward: the tests run a
# tiny sweep that way).
set -euo pipefail
cd "$(dirname "$0")"
SEEDS=${SEEDS:-"1 2 3"}
OUT=${OUT:-runs/ablate}
PYTHON=${PYTHON:-python}
SCRIPT=${SCRIPT:-demo.py}
RAFT_ARGS=${RAFT_ARGS:-}
# the minimalist sweep's RL regime: verl's shape (4 optimizer steps per sampled batch, one AdamW, a constant rate), at
# a rate the demo's model takes without falling at the first stage (1e-3 halved its pass@1), for 20 stages of b = 256
MINIMALIST_ARGS=${MINIMALIST_ARGS:-"--regime rl --mini_batches 4 --lr 3e-4 --prompts_per_stage 256 --stages 20
  --eval_samples 8 --micro_batch_size 256 --eval_kl"}

run() {  # run NAME SETTING [$SCRIPT arguments...]: one run per seed into $OUT/NAME/SETTING__s<seed>
  local name=$1 setting=$2
  shift 2
  for seed in $SEEDS; do
    local dir="$OUT/$name/${setting}__s$seed"
    mkdir -p "$OUT/$name"
    if [ -f "$dir.done" ]; then echo "ablation $name: $setting, seed $seed: done, skipped"; continue; fi
    echo "ablation $name: $setting, seed $seed -> $dir"
    # shellcheck disable=SC2086  # RAFT_ARGS is a list of words
    "$PYTHON" "$SCRIPT" --seed "$seed" --out_dir "$dir" --resume $RAFT_ARGS "$@" >"$dir.log" 2>&1 ||
      { echo "failed: see $dir.log"; tail -5 "$dir.log"; exit 1; }
    touch "$dir.done"  # written only after the run ended well: a rerun skips it without starting Python
  done
}

ablation() {
  case $1 in
    k)             # paper Table 5: K = 8/16/32 -> higher reward; here K = 2/4/8 at equal stages
      run k K=2 --K 2; run k K=4 --K 4; run k K=8 --K 8 ;;
    temperature)   # paper Table 6: λ = 0.7/0.85/1.0 -> reward vs diversity
      run temperature lambda=0.7 --temperature 0.7; run temperature lambda=1.0 --temperature 1.0
      run temperature lambda=1.3 --temperature 1.3 ;;
    kl)            # paper Table 7: β in r − β·KL
      run kl beta=0 --kl_beta 0 --eval_kl; run kl beta=0.1 --kl_beta 0.1; run kl beta=1 --kl_beta 1 ;;
    ranking)       # local (paper), global (appendix), random (the control: same budget, no ranking)
      run ranking local --ranking local; run ranking global --ranking global; run ranking random --ranking random ;;
    distill)       # paper Table 8: a stronger model generates, the policy trains on the kept samples
      run distill teacher --stages 12 --lr 2e-4
      local teacher
      teacher=$(ls -d "$OUT"/distill/teacher__s"${SEEDS%% *}"/stage_0012)
      run distill self-generated
      run distill teacher-generated --generator_model "$teacher" ;;
    finetune_from) # fine-tune the current model each stage (paper) or restart from the base (ReST-EM)
      run finetune_from current --finetune_from current; run finetune_from base --finetune_from base ;;
    minimalist)    # Xiong et al. 2025 in miniature: the arithmetic demo (0/1 reward) in the RL regime, every sample
      local SCRIPT=demo.py  # --demo arithmetic is demo.py's option, whatever SCRIPT says
      local rl="--demo arithmetic $MINIMALIST_ARGS"
      # shellcheck disable=SC2086  # rl is a list of words
      {
        run minimalist raft $rl --ranking all --advantage correct --loss sft
        run minimalist raftpp $rl --ranking all --advantage correct --loss clip
        run minimalist is-no-clip $rl --ranking all --advantage correct --loss is
        run minimalist reinforce $rl --ranking all --advantage reinforce --loss clip
        run minimalist reinforce-rej $rl --ranking all --advantage reinforce --drop_all_correct --drop_all_wrong \
          --loss clip
        run minimalist grpo $rl --ranking all --advantage grpo --loss clip
        run minimalist raftpp-clip-high $rl --ranking all --advantage correct --loss clip --clip_eps_high 0.28
        run minimalist best-of-K $rl --ranking local --advantage one --loss sft
        run minimalist random $rl --ranking random --advantage one --loss sft
      } ;;
    *) echo "unknown ablation: $1 (k, temperature, kl, ranking, distill, finetune_from, minimalist, all)"; exit 2 ;;
  esac
  "$PYTHON" eval.py --sweep "$OUT/$1"
}

if [ "${1:-}" = all ]; then
  for a in k temperature kl ranking distill finetune_from minimalist; do ablation "$a"; done
else
  ablation "${1:?usage: bash ablate.sh k|temperature|kl|ranking|distill|finetune_from|minimalist|all}"
fi
