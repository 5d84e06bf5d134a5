#!/usr/bin/env bash
# The whole RWML pipeline, one command: collect -> filter -> WM SFT | RWML -> policy RL from the start, WM SFT and
# RWML -> evaluate every arm in one process -> report (report.md, curves.png, summary.json).
# Usage: bash run.sh [--quick] [--env alfworld|tau2] [--model NAME] [--out DIR] [--launcher "torchrun ..."]
#   --quick  the miniature for a 2-core CPU (SmolLM2-135M, ~30 minutes): every arm starts from a cold start that
#            teaches the answer formats (see "The miniature" below); without it, the paper's settings (a GPU box).
#   --env    the paper's ALFWorld pipeline (default) or its τ²-bench one (paper settings only, not --quick).
# Every stage writes DONE ("<seconds> s") into its folder when it finishes and is skipped on a rerun; a stage that
# was killed continues from its own resume state (collect/filter/evaluate skip finished rows, training resumes its
# checkpoint).
set -euo pipefail
cd "$(dirname "$0")"

QUICK=0; MODEL=smollm2-135m; OUT=""; LAUNCH="python"; ENV=alfworld
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --env) ENV="$2"; shift ;;
    --model) MODEL="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --launcher) LAUNCH="$2"; shift ;;
    *) echo "run.sh: unknown flag $1 (flags: --quick --env ENV --model NAME --out DIR --launcher CMD)" >&2; exit 2 ;;
  esac
  shift
done
case "$ENV" in alfworld|tau2) ;; *) echo "run.sh: --env must be alfworld or tau2, got $ENV" >&2; exit 2 ;; esac
if [ "$QUICK" = 1 ] && [ "$ENV" = tau2 ]; then
  echo "run.sh: --quick is the ALFWorld/TextWorld-Express miniature; --env tau2 runs the paper's setting" >&2; exit 2
fi
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
export RWML_CACHE="${RWML_CACHE:-$HOME/.cache/rwml}"

# ALFWorld games: $ALFWORLD_DATA, else unpack the offline archive that sits beside the project.
if [ "$ENV" = alfworld ] && [ -z "${ALFWORLD_DATA:-}" ]; then
  export ALFWORLD_DATA="$RWML_CACHE/alfworld"
  if [ ! -d "$ALFWORLD_DATA/json_2.1.1" ]; then
    archive=../shared/alfworld/json_2.1.1.tar.xz
    [ -f "$archive" ] || { echo "no ALFWorld games: run alfworld-download, or set ALFWORLD_DATA" >&2; exit 1; }
    python -m envs.alfworld unpack "$archive" --dest "$ALFWORLD_DATA"
  fi
fi

# Paper Table 3 (forgetting): its general benchmarks through lm-eval, run by the paper-setting evaluations (their
# datasets come from the hub; GPQA is gated: log in, or drop it here)
TABLE3="--lm-eval-tasks mmlu_redux_generative,ifeval,minerva_math500,gsm8k,gpqa_diamond_cot_zeroshot"
if [ "$QUICK" = 1 ]; then
  # ---- The miniature (edit here for an ablation) ------------------------------------------------------------
  # Data: random admissible actions (--explore 1: no model needed, every transition valid). The train games are
  # split by game: a third teaches the cold start, the rest train WM SFT and RWML. World-model accuracy is measured
  # on games of another split (valid_unseen) that no stage trains on; the agent arms play TextWorld-Express coin,
  # a game a small model wins sometimes, and the cold start's format examples come from its train seeds.
  # Cold start = the filter model: a short SFT on the held-back third (the paper's filter model is an SFT on a
  # disjoint 10%) plus format-only agent examples; every arm starts from it, and so does the "base" row.
  OUT=${OUT:-runs/quick}
  P="--precision bf16"
  COLLECT="--env alfworld --split train --n-tasks 18 --rollouts 1 --max-steps 10 --explore 1 --val-split tasks \
           --val-frac 0.34 --n-workers 2"
  HELDOUT="--env alfworld --split valid_unseen --n-tasks 24 --rollouts 1 --max-steps 10 --explore 1 --val-frac 0 \
           --n-workers 2"
  FORMAT="--env twx --split train --task-type coin --n-tasks 8 --rollouts 1 --max-steps 6 --explore 1"
  FILTER="--epochs 1 --lr 5e-5 --batch-size 8 --micro-batch 8 --sft-prompt rwml --k 4 --max-new-tokens 48 $P"
  SFT="--epochs 1 --lr 1e-4 --batch-size 8 --micro-batch 8 --sft-prompt rwml $P"
  RWML="--max-steps 8 --prompts-per-step 4 --group-size 16 --max-new-tokens 48 --micro-batch 32 --lr 3e-5 \
        --val-size 64 --val-every 4 --save-every 100 $P"
  POLICY="--env twx --task-type coin --max-steps 2 --prompts-per-step 2 --group-size 4 --max-env-steps 5 \
          --max-new-tokens 24 --save-every 100 $P"
  EVAL="--n-triples 200 --max-new-tokens 64 --env twx --task-type coin --agent-splits test --n-tasks 16 \
        --max-steps 5 --batch-size 32 --greedy $P"
elif [ "$ENV" = tau2 ]; then
  # ---- τ²-bench, the paper's setting (README "The paper's setting", its τ² paragraph) -----------------------------
  OUT=${OUT:-runs/full_tau2}
  EMBED="--embedder Qwen/Qwen3-Embedding-8B"
  # user simulators, litellm model names: the paper's GPT-4.1 and Qwen3-235B-A22B-Instruct (e.g. a vLLM server:
  # set HOSTED_VLLM_API_BASE); collection plays 3 rollouts with each, training and evaluation use the second
  SIM_A=${TAU2_USER_A:-litellm:gpt-4.1}; SIM_B=${TAU2_USER_B:-litellm:hosted_vllm/Qwen/Qwen3-235B-A22B-Instruct-2507}
  LONG="--max-prompt-tokens 16384"   # τ² world-model prompts: 5-9k tokens (system prompt, tools, 5 turns)
  COLLECT="--env tau2 --split train --history 5 --rollouts 6 --user-model $SIM_A,$SIM_B --n-workers 8"  # 178 tasks
  FILTER="--tau-d 0.15 --tau-d-user 0.15 --reward-max-tokens 512 $LONG $EMBED"
  SFT="$LONG"
  RWML="--group-size 16 --tau-d-user 0.4 --reward-max-tokens 512 --val-size 256 $LONG $EMBED"
  POLICY="--env tau2 --user-model $SIM_B --max-env-steps 30 --max-steps 200 --env-workers 8"   # 200 GRPO steps
  EVAL="--env tau2 --agent-splits test --user-model $SIM_B --max-state-tokens 512 --n-workers 8 $EMBED $TABLE3"
else
  # ---- The paper's setting (README "The paper's setting"; defaults follow the paper where it is explicit) -------
  OUT=${OUT:-runs/full}
  EMBED="--embedder Qwen/Qwen3-Embedding-8B"   # the paper's reward embedder (its thresholds were set on it)
  COLLECT="--env alfworld --split train --n-tasks 2048 --n-workers 8"   # 3 rollouts, 30 steps, T=1.0, 90/10 triples
  FILTER="$EMBED"             # SFT on the 10% val triples, K=10, strict tau_d 0.1, keep p=0.1
  SFT=""                      # 2 epochs, lr 2e-6, batch 32, the paper's WM SFT prompt
  RWML="--val-size 256 $EMBED"   # 32 prompts x G=8, lr 1e-6, beta 0.001, 2 epochs
  POLICY="--env alfworld --max-steps 300 --env-workers 8"   # 8 tasks x 8 episodes, 15 steps, 300 steps
  EVAL="--env alfworld --agent-splits valid_seen,valid_unseen --max-steps 30 --n-workers 8 $EMBED $TABLE3"
fi
mkdir -p "$OUT"
C="$OUT/collect"; H="$OUT/heldout"; T="$OUT/format"; F="$OUT/filter"; S="$OUT/wm_sft"; R="$OUT/rwml"
E="$OUT/eval"

stage() {  # stage NAME DIR CMD...: run CMD unless DIR/DONE exists
  local name=$1 dir=$2; shift 2
  if [ -f "$dir/DONE" ]; then echo "== $name: done, skipped"; return; fi
  echo "== $name"; local t0=$(date +%s)
  "$@"
  mkdir -p "$dir"; echo "$(( $(date +%s) - t0 )) s" > "$dir/DONE"
}
resume_flag() { [ -f "$1/ckpt/latest" ] && echo --resume || true; }

stage collect "$C" $LAUNCH collect.py --model "$MODEL" --out-dir "$C" $COLLECT
if [ "$QUICK" = 1 ]; then
  stage heldout "$H" python collect.py --model "$MODEL" --out-dir "$H" $HELDOUT
  stage format "$T" python collect.py --model "$MODEL" --out-dir "$T" $FORMAT
  WM_TRIPLES="$H/triples_train.jsonl"; START="$F"; FILTER="$FILTER --format-episodes $T/episodes.jsonl"
  SFT_WM_PROMPT=rwml   # the miniature trains WM SFT on the RWML prompt too: the two arms differ only in the objective
else
  WM_TRIPLES="$C/triples_val.jsonl"; START="$MODEL"; SFT_WM_PROMPT=sft   # WM SFT learned the paper's SFT prompt
fi
stage filter "$F" $LAUNCH filter.py --model "$MODEL" --triples "$C/triples_train.jsonl" \
  --val-triples "$C/triples_val.jsonl" --out-dir "$F" $FILTER
stage wm_sft "$S" $LAUNCH filter.py --sft-only --model "$START" --triples "$F/filtered.jsonl" --out-dir "$S" $SFT
stage rwml "$R" $LAUNCH train_rwml.py --task wm --model "$START" --data "$F/filtered.jsonl" \
  --val-data "$WM_TRIPLES" --out-dir "$R" $RWML $(resume_flag "$R")
# Policy RL from the start model, from WM SFT and from RWML (paper Table 1's last rows)
declare -A FROM=([policy]="$START" [wm_sft_policy]="$S" [rwml_policy]="$R")
for arm in policy wm_sft_policy rwml_policy; do
  stage "$arm" "$OUT/$arm" $LAUNCH train_rwml.py --task policy --model "${FROM[$arm]}" --out-dir "$OUT/$arm" \
    $POLICY $(resume_flag "$OUT/$arm")
done

# Evaluation, one process per group of arms (each model and the reward embedder load once): world-model accuracy
# on held-out triples for the world-model arms (with the prompt each was trained on), agent success for every arm,
# weight change against the start model, the forgetting probe. Results land in $E/<arm>/.
EVALS="wm,agent,weights,forgetting"
stage eval_wm "$OUT/eval_wm" python evaluate.py --what arms --arms "base=$START,rwml=$R" --base "$START" \
  --evals $EVALS --triples "$WM_TRIPLES" --out-dir "$E" $EVAL
stage eval_wm_sft "$OUT/eval_wm_sft" python evaluate.py --what arms --arms "wm_sft=$S" --base "$START" \
  --evals $EVALS --triples "$WM_TRIPLES" --wm-prompt "$SFT_WM_PROMPT" --out-dir "$E" $EVAL
stage eval_policy "$OUT/eval_policy" python evaluate.py --what arms --base "$START" --evals agent,weights,forgetting \
  --arms "policy=$OUT/policy,wm_sft_policy=$OUT/wm_sft_policy,rwml_policy=$OUT/rwml_policy" --out-dir "$E" $EVAL
python evaluate.py --what report --runs "base=$E/base,wm_sft=$E/wm_sft,rwml=$E/rwml,policy=$E/policy,wm_sft_policy=$E/wm_sft_policy,rwml_policy=$E/rwml_policy" \
  --curves "rwml=$R,policy=$OUT/policy,wm_sft_policy=$OUT/wm_sft_policy,rwml_policy=$OUT/rwml_policy" \
  --stages "$OUT" --out-dir "$OUT/report"
echo "report: $OUT/report/report.md"
