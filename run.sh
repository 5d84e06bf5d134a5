#!/usr/bin/env bash
# The whole RWML pipeline, one command: collect -> filter -> WM SFT | RWML -> policy RL from the start, WM SFT and
# RWML; Early Experience's baselines (paper Table 2) from expert data: imitation learning, IWM, SR -> evaluate every
# arm in one process -> report (report.md, curves.png, summary.json).
# Usage: bash run.sh [--quick | --medium] [--all-arms] [--env alfworld|tau2] [--model NAME] [--out DIR] [--launcher "torchrun ..."]
#   --quick  the miniature for a 2-core CPU (SmolLM2-135M, ~19 minutes): every arm starts from a cold start that
#            teaches the answer formats (see "The miniature" below); it shows RWML learn (reward, weights), on 100
#            held-out triples; without it, the paper's settings (a GPU box).
#   --medium the larger miniature (~37 minutes on the same CPU): --quick's recipe with twice the games, the paper's
#            too-easy rule and a too-hard one, RWML at temperature 1.2 for four times the steps, 400 held-out
#            triples, for the world-model arms only (base, wm_sft, rwml); the effect that --quick is too small to
#            resolve (README "Results").
#   --all-arms  with --quick, also the arms beyond Table 1 (Early Experience IL/IWM/SR, GiGPO, ECHO, Dyna) and the
#            world-model accuracy of the agent arms (~63 minutes more); the paper setting always runs them.
#   --env    the paper's ALFWorld pipeline (default) or its τ²-bench one (paper settings only, not --quick).
# Every stage writes DONE ("<seconds> s") into its folder when it finishes and is skipped on a rerun; a stage that
# was killed continues from its own resume state (collect/filter/evaluate skip finished rows, training resumes its
# checkpoint).
set -euo pipefail
cd "$(dirname "$0")"

QUICK=0; MEDIUM=0; ALL_ARMS=0; MODEL=smollm2-135m; OUT=""; LAUNCH="python"; ENV=alfworld
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --medium) QUICK=1; MEDIUM=1 ;;
    --all-arms) ALL_ARMS=1 ;;
    --env) ENV="$2"; shift ;;
    --model) MODEL="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --launcher) LAUNCH="$2"; shift ;;
    *) echo "run.sh: unknown flag $1 (flags: --quick --medium --all-arms --env ENV --model NAME --out DIR --launcher CMD)" >&2; exit 2 ;;
  esac
  shift
done
case "$ENV" in alfworld|tau2) ;; *) echo "run.sh: --env must be alfworld or tau2, got $ENV" >&2; exit 2 ;; esac
if [ "$QUICK" = 1 ] && [ "$ENV" = tau2 ]; then
  echo "run.sh: --quick is the ALFWorld/TextWorld-Express miniature; --env tau2 runs the paper's setting" >&2; exit 2
fi
if [ "$MEDIUM" = 1 ] && [ "$ALL_ARMS" = 1 ]; then
  echo "run.sh: --medium runs the world-model arms only; --all-arms goes with --quick" >&2; exit 2
fi
[ "$QUICK" = 1 ] || ALL_ARMS=1   # the miniature keeps to Table 1's arms unless asked (its time budget)
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
  # ---- The miniature (edit configs/quick/*.json for an ablation) ---------------------------------------------
  # Data: random admissible actions (--explore 1: no model needed, every transition valid). The train games are
  # split by game: a third teaches the cold start, the rest train WM SFT and RWML. World-model accuracy is measured
  # on games of another split (valid_unseen) that no stage trains on; the agent arms play TextWorld-Express coin,
  # a game a small model wins sometimes, and the cold start's format examples come from its train seeds.
  # Cold start = the filter model: a short SFT on the held-back third (the paper's filter model is an SFT on a
  # disjoint 10%) plus format-only agent examples; every arm starts from it, and so does the "base" row.
  OUT=${OUT:-runs/$([ "$MEDIUM" = 1 ] && echo medium || echo quick)}
  Q=configs/quick
  COLLECT="--config $Q/collect.json"; HELDOUT="--config $Q/heldout.json"; FORMAT="--config $Q/format.json"
  FILTER="--config $Q/filter.json"; SFT="--config $Q/wm_sft.json"; RWML="--config $Q/rwml.json"
  WM_SFT_STEPS="--max-steps 8"   # WM SFT stops at RWML's 8 optimizer steps: the world-model arms train as long
  POLICY="--config $Q/policy.json"; EVAL="--config $Q/eval.json"
  # Early Experience: expert episodes on the game the agent arms play (coin's gold path), 3 random admissible
  # alternatives from every expert state; IL / IWM / SR train like WM SFT ($SFT), SR's rationales are short
  EXPERT="--config $Q/expert.json"; SR="--max-new-tokens 48"
  if [ "$MEDIUM" = 1 ]; then   # the same presets, more of everything the world-model comparison needs
    COLLECT="$COLLECT --n-tasks 36"; HELDOUT="$HELDOUT --n-tasks 48"; EVAL="$EVAL --n-triples 400"
    # RWML samples (and scores) at temperature 1.2, not the paper's 1.0: the cold start's answers are so sure that
    # at 1.0 most groups were 16 identical answers (README "Results")
    RWML="$RWML --max-steps 32 --val-every 8 --val-size 64 --temperature 1.2"; WM_SFT_STEPS=""   # WM SFT: 7 steps
    # the paper's "too easy" rule (any hit of K = 4; --quick skips it: its all-K version removed 3 of 120 triples for
    # 2 minutes of the run). Not the paper's: --hard-tau-d 0.2 also drops the triples none of whose 4 samples earns
    # the training reward, whose RWML groups were 16 wrong answers. RWML's gain over the cold start was the same
    # with it (+11.0 points) as without (+12.0), from 62 kept triples instead of 147 (README "Results")
    FILTER="$FILTER --k 4 --min-hits 1 --hard-tau-d 0.2"
  fi
  # Dyna: RWML's quick shape on the policy step's transitions (4 prompts x G 16, 48 new tokens); a checkpoint after
  # every step, so that the report draws its line through them
  DYNA="--dyna-coef 1 --dyna-prompts 4 --dyna-group-size 16 --dyna-max-new-tokens 48 --save-every 1"
  CHECKPOINTS=all
elif [ "$ENV" = tau2 ]; then
  # ---- τ²-bench, the paper's setting (configs/tau2_*.json; README "The paper's setting", its τ² paragraph) -------
  OUT=${OUT:-runs/full_tau2}
  # user simulators, litellm model names: the paper's GPT-4.1 and Qwen3-235B-A22B-Instruct (e.g. a vLLM server:
  # set HOSTED_VLLM_API_BASE); collection plays 3 rollouts with each, training and evaluation use the second
  SIM_A=${TAU2_USER_A:-litellm:gpt-4.1}; SIM_B=${TAU2_USER_B:-litellm:hosted_vllm/Qwen/Qwen3-235B-A22B-Instruct-2507}
  COLLECT="--config configs/tau2_collect.json --user-model $SIM_A,$SIM_B --n-workers 8"   # 3 + 3 rollouts, history 5
  FILTER="--config configs/tau2_filter.json"   # tau_d 0.15 for env and user replies, 512-token reward truncation
  SFT="--config configs/tau2_filter.json"
  RWML="--config configs/tau2_wm.json"         # G=16, tau_d_user 0.4
  POLICY="--config configs/tau2_policy.json --user-model $SIM_B --env-workers 8"   # 200 GRPO steps
  EVAL="--env tau2 --agent-splits test --user-model $SIM_B --max-state-tokens 512 --n-workers 8 \
        --embedder Qwen/Qwen3-Embedding-8B $TABLE3"
  CHECKPOINTS=last         # all: also each earlier kept checkpoint, one more agent evaluation per arm and checkpoint
else
  # ---- The paper's setting (configs/alfworld_*.json; README "The paper's setting") ----------------------------
  OUT=${OUT:-runs/full}
  COLLECT="--config configs/alfworld_collect.json --n-workers 8"   # 3 rollouts x 2048 tasks, 30 steps, 90/10 triples
  FILTER="--config configs/alfworld_filter.json"   # SFT on the 10% val triples, K=10, strict tau_d 0.1, keep p=0.1
  SFT="--config configs/alfworld_filter.json"      # the same SFT (2 epochs, lr 2e-6, batch 32, the paper's prompt)
  RWML="--config configs/alfworld_wm.json"         # 32 prompts x G=8, lr 1e-6, beta 0.001, 2 epochs
  POLICY="--config configs/alfworld_policy.json --env-workers 8"   # 8 tasks x 8 episodes, 15 steps, 300 steps
  EVAL="--env alfworld --agent-splits valid_seen,valid_unseen --max-env-steps 30 --n-workers 8 \
        --embedder Qwen/Qwen3-Embedding-8B $TABLE3"
  # the walkthrough (then alfworld's expert); 3 random admissible alternatives per state
  EXPERT="--config configs/alfworld_expert.json --n-workers 8"
  SR=""                    # rationales: --model at temperature 1.0, up to 256 tokens
  DYNA="--dyna-coef 1"     # 32 of each step's transitions x G 8, the world-model loss at the policy loss's weight
  CHECKPOINTS=last         # all: also each earlier kept checkpoint, one more agent evaluation per arm and checkpoint
fi
mkdir -p "$OUT"
C="$OUT/collect"; H="$OUT/heldout"; T="$OUT/format"; F="$OUT/filter"; S="$OUT/wm_sft"; R="$OUT/rwml"
X="$OUT/expert"; E="$OUT/eval"

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
  WM_TRIPLES="$H/triples_train.jsonl"; START="$F"; FILTER="$FILTER --agent-episodes $T/episodes.jsonl"
  SFT_WM_PROMPT=rwml   # the miniature trains WM SFT on the RWML prompt too: the two arms differ only in the objective
else
  WM_TRIPLES="$C/triples_val.jsonl"; START="$MODEL"; SFT_WM_PROMPT=sft   # WM SFT learned the paper's SFT prompt
fi
stage filter "$F" $LAUNCH filter.py --model "$MODEL" --triples "$C/triples_train.jsonl" \
  --val-triples "$C/triples_val.jsonl" --out-dir "$F" $FILTER
stage wm_sft "$S" $LAUNCH filter.py --sft-only --model "$START" --triples "$F/filtered.jsonl" --out-dir "$S" $SFT \
  ${WM_SFT_STEPS:-}
stage rwml "$R" $LAUNCH train_rwml.py --task wm --model "$START" --data "$F/filtered.jsonl" \
  --val-data "$WM_TRIPLES" --out-dir "$R" $RWML $(resume_flag "$R")
# Policy RL from the start model, from WM SFT and from RWML (paper Table 1's last rows)
declare -A FROM=([policy]="$START" [wm_sft_policy]="$S" [rwml_policy]="$R")
POLICY_ARMS="policy wm_sft_policy rwml_policy"
[ "$MEDIUM" = 1 ] && POLICY_ARMS=""
for arm in $POLICY_ARMS; do
  stage "$arm" "$OUT/$arm" $LAUNCH train_rwml.py --task policy --model "${FROM[$arm]}" --out-dir "$OUT/$arm" \
    $POLICY $(resume_flag "$OUT/$arm")
done
# Policy objectives beyond GRPO (new here, not in the paper; README "Policy objectives beyond GRPO"): GiGPO's step
# advantages from the start model and from RWML, ECHO's observation cross-entropy from the start model, Dyna (the
# world-model GRPO loss on each step's own transitions, added to the policy's) from the start model
declare -A OBJ_FROM=([gigpo]="$START" [rwml_gigpo]="$R" [echo]="$START" [dyna]="$START")
# (GiGPO's step advantages and ECHO's observation loss have signal inside a group whose episodes all score the
# same, so those arms keep zero-variance groups where the miniature's preset drops them)
declare -A OBJ_FLAGS=([gigpo]="--step-advantage gigpo --no-drop-zero-var"
                      [rwml_gigpo]="--step-advantage gigpo --no-drop-zero-var"
                      [echo]="--echo-coef 0.1 --no-drop-zero-var" [dyna]="${DYNA:-}")
OBJ_ARMS="gigpo rwml_gigpo echo dyna"
[ "$ENV" = tau2 ] && OBJ_ARMS="gigpo rwml_gigpo"
[ "$ALL_ARMS" = 1 ] || OBJ_ARMS=""   # ECHO and Dyna read the text-game prompt and triples, not τ²'s
for arm in $OBJ_ARMS; do
  stage "$arm" "$OUT/$arm" $LAUNCH train_rwml.py --task policy --model "${OBJ_FROM[$arm]}" --out-dir "$OUT/$arm" \
    $POLICY ${OBJ_FLAGS[$arm]} $(resume_flag "$OUT/$arm")
done

# Early Experience's baselines, each from the start model: imitation learning on the expert's steps; IWM = WM SFT
# on the alternatives' next states, then imitation learning; SR = rationales + expert action mixed with imitation
EE_RUNS=""
if [ "$ALL_ARMS" = 1 ] && [ "$ENV" = alfworld ]; then   # text games only: a τ² agent's prompt is τ²'s live conversation, not kept per step
  stage expert "$X" python collect.py --model "$MODEL" --out-dir "$X" $EXPERT
  stage il "$OUT/il" $LAUNCH filter.py --sft-only --model "$START" --triples "" --agent-episodes "$X/episodes.jsonl" \
    --out-dir "$OUT/il" $SFT
  stage iwm_wm "$OUT/iwm_wm" $LAUNCH filter.py --sft-only --model "$START" --triples "$X/triples_alt.jsonl" \
    --out-dir "$OUT/iwm_wm" $SFT
  stage iwm "$OUT/iwm" $LAUNCH filter.py --sft-only --model "$OUT/iwm_wm" --triples "" \
    --agent-episodes "$X/episodes.jsonl" --out-dir "$OUT/iwm" $SFT
  stage sr "$OUT/sr" $LAUNCH filter.py --sft-only --model "$START" --triples "" --agent-episodes "$X/episodes.jsonl" \
    --reflections "$X/triples_alt.jsonl" --out-dir "$OUT/sr" $SFT $SR
  EE_RUNS="il=$OUT/il,iwm=$OUT/iwm,sr=$OUT/sr"
fi

# Evaluation, one process per group of arms (each model and the reward embedder load once): world-model accuracy
# on held-out triples for the world-model arms (with the prompt each was trained on), agent success for every arm,
# weight change against the start model, the forgetting probe. Results land in $E/<arm>/.
EVALS="wm,agent,weights,forgetting"
[ "$MEDIUM" = 1 ] && EVALS="wm,weights,forgetting"
WM_EVAL_ARMS="base=$START,rwml=$R"   # WM SFT joins them where it learned the same (RWML) prompt
[ "$SFT_WM_PROMPT" = rwml ] && WM_EVAL_ARMS="base=$START,wm_sft=$S,rwml=$R"
stage eval_wm "$OUT/eval_wm" python evaluate.py --what arms --arms "$WM_EVAL_ARMS" --base "$START" \
  --evals $EVALS --triples "$WM_TRIPLES" --out-dir "$E" $EVAL
[ "$SFT_WM_PROMPT" = sft ] && stage eval_wm_sft "$OUT/eval_wm_sft" python evaluate.py --what arms \
  --arms "wm_sft=$S" --base "$START" --evals $EVALS --triples "$WM_TRIPLES" --wm-prompt sft --out-dir "$E" $EVAL
POLICY_RUNS=$(for a in $POLICY_ARMS; do printf '%s=%s,' "$a" "$OUT/$a"; done); POLICY_RUNS=${POLICY_RUNS%,}
[ -n "$POLICY_RUNS" ] && stage eval_policy "$OUT/eval_policy" python evaluate.py --what arms --base "$START" \
  --evals agent,weights,forgetting --arms "$POLICY_RUNS" --out-dir "$E" $EVAL
[ -n "$EE_RUNS" ] && stage eval_ee "$OUT/eval_ee" python evaluate.py --what arms --base "$START" \
  --evals agent,weights,forgetting --arms "$EE_RUNS" --out-dir "$E" $EVAL
OBJ_RUNS=$(for a in $OBJ_ARMS; do printf '%s=%s,' "$a" "$OUT/$a"; done); OBJ_RUNS=${OBJ_RUNS%,}
[ -n "$OBJ_RUNS" ] && stage eval_objectives "$OUT/eval_objectives" python evaluate.py --what arms --base "$START" \
  --evals agent,weights,forgetting --arms "$OBJ_RUNS" --out-dir "$E" $EVAL
# World-model accuracy of the agent arms too (the report plots it against success), on the RWML prompt: every arm
# whose world-model training, if any, used it (in the paper setting WM SFT and IWM learned the SFT prompt, so
# WM SFT + policy and the Early Experience arms are left out there); with --checkpoints all also the WM accuracy and
# success of each earlier checkpoint of these arms and of RWML (the report draws their lines)
WM_ARMS="rwml=$R,policy=$OUT/policy,rwml_policy=$OUT/rwml_policy${OBJ_RUNS:+,$OBJ_RUNS}"
[ "$SFT_WM_PROMPT" = rwml ] && WM_ARMS="$WM_ARMS,wm_sft_policy=$OUT/wm_sft_policy${EE_RUNS:+,$EE_RUNS}"
[ "$ALL_ARMS" = 1 ] && stage eval_policy_wm "$OUT/eval_policy_wm" python evaluate.py --what arms --evals wm,agent \
  --checkpoints "$CHECKPOINTS" --arms "$WM_ARMS" --triples "$WM_TRIPLES" --out-dir "$E" $EVAL
TRAINED_RUNS="$POLICY_RUNS${EE_RUNS:+,$EE_RUNS}${OBJ_RUNS:+,$OBJ_RUNS}"; TRAINED_RUNS=${TRAINED_RUNS#,}
python evaluate.py --what report --runs "base=$E/base,wm_sft=$E/wm_sft,rwml=$E/rwml${TRAINED_RUNS:+,${TRAINED_RUNS//$OUT\//$E/}}" \
  --curves "rwml=$R${POLICY_RUNS:+,$POLICY_RUNS}${OBJ_RUNS:+,$OBJ_RUNS}" \
  --stages "$OUT" --out-dir "$OUT/report"
echo "report: $OUT/report/report.md"
