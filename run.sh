#!/usr/bin/env bash
# The whole RWML pipeline on the offline default (SmolLM2-135M-Instruct on the official ALFWorld games):
#   collect -> filter (+ WM SFT baseline) -> RWML -> policy RL from base and from RWML -> evaluate all -> report
# Usage: bash run.sh [--quick] [--model NAME] [--out DIR] [--launcher "torchrun --nproc_per_node 8"]
#   --quick  a smoke-sized run (minutes on a 2-core CPU); without it, paper-sized settings (a GPU box).
# Every stage writes DONE into its folder when it finishes and is skipped on a rerun; a stage that was killed
# continues from its own resume state (collect/filter/evaluate skip finished rows, training resumes its checkpoint).
set -euo pipefail
cd "$(dirname "$0")"

QUICK=0; MODEL=smollm2-135m; OUT=""; LAUNCH="python"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --model) MODEL="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --launcher) LAUNCH="$2"; shift ;;
    *) echo "run.sh: unknown flag $1 (flags: --quick --model NAME --out DIR --launcher CMD)" >&2; exit 2 ;;
  esac
  shift
done
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
export RWML_CACHE="${RWML_CACHE:-$HOME/.cache/rwml}"

# ALFWorld games: $ALFWORLD_DATA, else unpack the offline archive that sits beside the project.
if [ -z "${ALFWORLD_DATA:-}" ]; then
  export ALFWORLD_DATA="$RWML_CACHE/alfworld"
  if [ ! -d "$ALFWORLD_DATA/json_2.1.1" ]; then
    archive=../shared/alfworld/json_2.1.1.tar.xz
    [ -f "$archive" ] || { echo "no ALFWorld games: run alfworld-download, or set ALFWORLD_DATA" >&2; exit 1; }
    python -m envs.alfworld unpack "$archive" --dest "$ALFWORLD_DATA"
  fi
fi

if [ "$QUICK" = 1 ]; then
  OUT=${OUT:-runs/quick}
  COLLECT="--n-tasks 6 --rollouts 2 --max-steps 4 --max-new-tokens 64 --batch-size 12 --n-workers 2 --explore 0.5"
  FILTER="--epochs 1 --k 2 --max-new-tokens 48 --micro-batch 2 --batch-size 2"
  SFT="--epochs 1 --micro-batch 2 --batch-size 2"
  RWML="--max-steps 3 --prompts-per-step 4 --group-size 4 --max-new-tokens 64 --micro-batch 8 --val-size 8 --val-every 3"
  POLICY="--env alfworld --max-steps 2 --prompts-per-step 2 --group-size 2 --max-env-steps 4 --max-new-tokens 64"
  EVAL="--n-tasks 3 --max-steps 6 --max-new-tokens 64 --batch-size 8"
  WMEVAL="--n-triples 16 --max-new-tokens 64"
else
  OUT=${OUT:-runs/full}
  COLLECT="--n-workers 8"                      # paper: 3 rollouts x every train task, 30 steps, T=1.0
  FILTER=""                                    # paper: SFT on the val split, K=10, strict tau_d 0.1, keep p=0.1
  SFT=""                                       # paper: 2 epochs, lr 2e-6, batch 32
  RWML="--val-size 256"                        # paper: 32 prompts x G=8, lr 1e-6, beta 0.001, 2 epochs
  POLICY="--env alfworld --max-steps 300 --env-workers 8"   # paper: 8 tasks x 8 episodes, 15 steps, 300 steps
  EVAL="--max-steps 30 --n-workers 8"
  WMEVAL=""
fi
mkdir -p "$OUT"
C="$OUT/collect"; F="$OUT/filter"; S="$OUT/wm_sft"; R="$OUT/rwml"; P="$OUT/policy"; RP="$OUT/rwml_policy"; E="$OUT/eval"

stage() {  # stage NAME DIR CMD...: run CMD unless DIR/DONE exists
  local name=$1 dir=$2; shift 2
  if [ -f "$dir/DONE" ]; then echo "== $name: done, skipped"; return; fi
  echo "== $name"; local t0=$(date +%s)
  "$@"
  mkdir -p "$dir"; echo "$(( $(date +%s) - t0 )) s" > "$dir/DONE"
}
resume_flag() { [ -f "$1/ckpt/latest" ] && echo --resume || true; }

stage collect "$C" $LAUNCH collect.py --env alfworld --split train --model "$MODEL" --out-dir "$C" $COLLECT
stage filter "$F" $LAUNCH filter.py --model "$MODEL" --triples "$C/triples_train.jsonl" \
  --val-triples "$C/triples_val.jsonl" --out-dir "$F" $FILTER
stage wm_sft "$S" $LAUNCH filter.py --sft-only --model "$MODEL" --triples "$F/filtered.jsonl" --out-dir "$S" $SFT
stage rwml "$R" $LAUNCH train_rwml.py --task wm --model "$MODEL" --data "$F/filtered.jsonl" \
  --val-data "$C/triples_val.jsonl" --out-dir "$R" $RWML $(resume_flag "$R")
stage policy "$P" $LAUNCH train_rwml.py --task policy --model "$MODEL" --out-dir "$P" $POLICY $(resume_flag "$P")
stage rwml_policy "$RP" $LAUNCH train_rwml.py --task policy --model "$R" --out-dir "$RP" $POLICY $(resume_flag "$RP")

# Evaluate every checkpoint: ALFWorld valid_seen (ID) and valid_unseen (OOD), world-model accuracy, weight change.
declare -A MODELS=([base]="$MODEL" [wm_sft]="$S" [rwml]="$R" [policy]="$P" [rwml_policy]="$RP")
RUNS=""
for name in base wm_sft rwml policy rwml_policy; do
  m=${MODELS[$name]}
  for split in valid_seen valid_unseen; do
    stage "eval $name $split" "$E/$name/$split" python evaluate.py --what agent --model "$m" --env alfworld \
      --split "$split" --out-dir "$E/$name/$split" $EVAL
  done
  stage "eval $name wm" "$E/$name/wm" python evaluate.py --what wm --model "$m" \
    --triples "$C/triples_val.jsonl" --out-dir "$E/$name/wm" $WMEVAL
  if [ "$name" != base ]; then
    stage "eval $name weights" "$E/$name/weights" python evaluate.py --what weights --model "$m" --base "$MODEL" \
      --out-dir "$E/$name/weights"
  fi
  RUNS="$RUNS${RUNS:+,}$name=$E/$name"
done
python evaluate.py --what report --runs "$RUNS" --curves "rwml=$R,policy=$P,rwml_policy=$RP" --out-dir "$OUT/report"
echo "report: $OUT/report/report.md"
