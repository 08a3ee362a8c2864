#!/usr/bin/env bash
# The Multi30k evidence: 4 methods x (clean, noisy) x seeds -> examples/multi30k/RESULTS.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$ROOT/scripts/run_multi30k_benchmark.sh"

usage() {
    cat <<EOF
Usage: scripts/run_multi30k_benchmark.sh [options]

Prepares Multi30k De->En twice (clean, and with --noise at --noise-rate on the train pairs; both with
the same clean meta split), trains every method of --methods on both with every seed of --seeds
(same preset, seed and number of updates for all methods), evaluates BLEU/chrF on test_2016_flickr,
scores the weights of the noisy runs against the noise flags, and writes RESULTS.md plus plots.

Shared warm-up (--warmup W > 0): reweighting starts after W updates of plain training, and that prefix is
trained once per seed and condition (RUNS/COND/warmupW/seedS, --reweight-method none, W updates); every
method then continues from its checkpoint (fairseq's --continue-once: optimizer, lr schedule and data
order included), so all methods share the same first W updates and only the rest is paid per method.
The perfect-weight reference (method "perfect", noisy condition only) is plain training on the pairs
train.flags marks clean (a subset data-bin with the same dictionaries, scripts/mt_helpers.py subset), from
scratch with the same number of updates.

Runs are sequential (or --jobs N at a time) and resumable: a run whose checkpoint_last.pt, finished
train.log and bleu_test.json exist is skipped, so re-running the command picks up where it stopped.

Options:
  --seeds "S1 S2 ..."    training seeds (default "1 2"; >= 2 gives mean +- spread)
  --methods "M ..."      subset of "none l2rw mwnet deep perfect" (default all five), and the filter baselines
                         filter-SCORE (SCORE: teacher, source-contrast, loss, dual-xent; noisy condition only):
                         score the train pairs with fairseq-reweight-score (the none run of the seed, the deep run
                         for teacher, a backward model for dual-xent), keep the best --filter-keep, retrain none
  --max-update N         updates per run (default: the preset's, 1060 for small-cpu)
  --warmup W             shared plain warm-up of W updates (default 400; 0: every run from scratch)
  --preset P             train_translation.sh preset (default small-cpu; tiny-cpu for smoke runs)
  --noise TYPE           noise of the noisy condition (default misaligned)
  --noise-rate R         (default 0.3)
  --vocab N              sentencepiece vocabulary (default 8000)
  --meta-size N          clean meta pairs held out of train (default 1000)
  --data-seed N          seed of the meta split / noise / sentencepiece (default 1)
  --conditions "C ..."   subset of "clean noisy" (default both)
  --runs-dir DIR         checkpoints, logs and per-run results (default runs/multi30k in the checkout;
                         finished runs there are reused, so use another folder for another budget)
  --results-dir DIR      where RESULTS.md and the plots go (default examples/multi30k)
  --train-args "ARGS"    extra arguments for train_translation.sh / fairseq-train, every method
  --deep-args "ARGS"     extra arguments of the deep runs only (default "")
  --filter-keep F        fraction of the train pairs the filter-* methods keep (default 1 - --noise-rate, the
                         known clean fraction; 0.8 is what a user would pick blind)
  --filter-scorer S      checkpoint that scores the pairs for filter-{source-contrast,loss,dual-xent}: none (the
                         finished none run of the seed, default) or warmup (the shared plain warm-up of --warmup
                         updates: a cheaper scorer, no extra run)
  --gpu                  train and generate on the GPU (drops the preset's --cpu)
  --jobs N               runs at a time (default 2: two single-thread runs use both cores of a 2-core
                         machine; with N > 1 the seeds of one method/condition run side by side, so
                         the seconds per update of all methods are measured under the same load)
  --threads N            CPU threads per run (default 1; see train_translation.sh --threads)
  --report-only          only (re)write RESULTS.md from the runs on disk
  --carry                the rows of the results folder's results.json stand in for runs not on disk (a fresh
                         machine: every column, listed as carried over; rows outside the table are kept)
  --dry-run              print the runs that would be done
  -h, --help             this help
EOF
}

die() { echo "error: $*" >&2; exit 2; }
log() { echo "[benchmark $(date +%H:%M:%S)] $*" >&2; }

SEEDS="1 2" METHODS="none l2rw mwnet deep perfect" MAX_UPDATE="" WARMUP=400 PRESET=small-cpu NOISE=misaligned RATE=0.3
VOCAB=8000 META=1000 DATA_SEED=1 CONDITIONS="clean noisy" RUNS="$ROOT/runs/multi30k"
RESULTS="" CARRY="" TRAIN_ARGS="" DEEP_ARGS="" FILTER_KEEP="" FILTER_SCORER=none GPU="" JOBS=2 THREADS=1 REPORT_ONLY="" DRY="" ONE=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --seeds) SEEDS="${2:?}"; shift 2 ;;
        --methods) METHODS="${2:?}"; shift 2 ;;
        --max-update) MAX_UPDATE="${2:?}"; shift 2 ;;
        --warmup) WARMUP="${2:?}"; shift 2 ;;
        --preset) PRESET="${2:?}"; shift 2 ;;
        --noise) NOISE="${2:?}"; shift 2 ;;
        --noise-rate) RATE="${2:?}"; shift 2 ;;
        --vocab) VOCAB="${2:?}"; shift 2 ;;
        --meta-size) META="${2:?}"; shift 2 ;;
        --data-seed) DATA_SEED="${2:?}"; shift 2 ;;
        --conditions) CONDITIONS="${2:?}"; shift 2 ;;
        --runs-dir) RUNS="${2:?}"; shift 2 ;;
        --results-dir) RESULTS="${2:?}"; shift 2 ;;
        --train-args) TRAIN_ARGS="${2?}"; shift 2 ;;
        --deep-args) DEEP_ARGS="${2?}"; shift 2 ;;
        --filter-keep) FILTER_KEEP="${2:?}"; shift 2 ;;
        --filter-scorer) FILTER_SCORER="${2:?}"; shift 2 ;;
        --gpu) GPU=1; shift ;;
        --jobs) JOBS="${2:?}"; shift 2 ;;
        --threads) THREADS="${2:?}"; shift 2 ;;
        --report-only) REPORT_ONLY=1; shift ;;
        --carry) CARRY=1; shift ;;
        --dry-run) DRY=1; shift ;;
        --_one) ONE="${2:?}"; shift 2 ;;  # internal: "COND METHOD SEED"
        *) usage >&2; die "unknown option: $1" ;;
    esac
done
for m in $METHODS; do
    case "$m" in
        none|l2rw|mwnet|deep|perfect|filter-teacher|filter-source-contrast|filter-loss|filter-dual-xent) ;;
        *) [[ -n "$REPORT_ONLY" ]] || die "unknown method '$m' (none l2rw mwnet deep perfect filter-{teacher,source-contrast,loss,dual-xent}; named variants only with --report-only)" ;;
    esac
done
if [[ -z "$MAX_UPDATE" ]]; then
    case "$PRESET" in small-cpu) MAX_UPDATE=1060 ;; tiny-cpu) MAX_UPDATE=1200 ;; *) MAX_UPDATE=50000 ;; esac
fi
[[ -n "$RESULTS" ]] || RESULTS="$ROOT/examples/multi30k/$PRESET"
[[ -n "$FILTER_KEEP" ]] || FILTER_KEEP=$(python -c "print(round(1 - float('$RATE'), 6))")  # the clean fraction
[[ "$WARMUP" =~ ^[0-9]+$ ]] || die "--warmup must be a number"
case "$FILTER_SCORER" in none) ;; warmup) [[ "$WARMUP" -gt 0 ]] || die "--filter-scorer warmup needs --warmup > 0" ;;
    *) die "--filter-scorer must be none or warmup, got '$FILTER_SCORER'" ;; esac
for c in $CONDITIONS; do case "$c" in clean|noisy) ;; *) die "unknown condition '$c' (clean|noisy)" ;; esac; done
[[ -n "$SEEDS" ]] || die "--seeds is empty"
[[ "$MAX_UPDATE" =~ ^[0-9]+$ ]] || die "--max-update must be a number"
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || die "--jobs must be a positive number"
[[ "$THREADS" =~ ^[1-9][0-9]*$ ]] || die "--threads must be a positive number"
mkdir -p "$RUNS"
RUNS="$(cd "$RUNS" && pwd)"

EVAL_DEV=--cpu
[[ -z "$GPU" ]] || EVAL_DEV=""
DATA_CLEAN="$ROOT/data-bin/multi30k_de_en_v${VOCAB}_m${META}_s${DATA_SEED}"
DATA_NOISY="${DATA_CLEAN}_${NOISE}${RATE}"
DATA_PERFECT="${DATA_NOISY}_clean_pairs"
data_of() {  # COND METHOD
    if [[ "$1" == clean ]]; then echo "$DATA_CLEAN"
    elif [[ "${2:-}" == perfect ]]; then echo "$DATA_PERFECT"
    elif [[ "${2:-}" == filter-* ]]; then filter_data "$1" "$2" "${3:?}"

    else echo "$DATA_NOISY"; fi
}
run_dir() { echo "$RUNS/$1/$2/seed$3"; }
filter_data() { echo "$RUNS/$1/$2/seed$3/data-bin"; }  # COND METHOD SEED: the filtered data-bin of a filter run
# filter-SCORE: score the noisy train split with the checkpoint of this seed's none run (the teacher: its deep
# run; dual-xent: none + a backward model trained here), keep the best --filter-keep, re-binarize with the same
# dictionaries, retrain none from scratch on it (same preset and budget)
prepare_filter() {  # COND METHOD SEED
    local cond="$1" method="$2" seed="$3" score="${2#filter-}" data dir src ck extra=() bdir
    data=$(data_of "$cond" none); dir=$(run_dir "$cond" "$method" "$seed")
    [[ -f "$(filter_data "$cond" "$method" "$seed")/subset.json" ]] && return 0
    src=none; [[ "$score" == teacher ]] && src=deep
    ck="$(run_dir "$cond" "$src" "$seed")/checkpoint_last.pt"
    if [[ "$src" == none && "$FILTER_SCORER" == warmup ]]; then
        ensure_warmup "$cond" "$seed"
        ck="$(warmup_dir "$cond" "$seed")/checkpoint_last.pt"
    elif ! finished "$cond" "$src" "$seed"; then
        log "$cond/$method/seed$seed: needs the finished $src run of seed $seed first"
        one_run "$cond" "$src" "$seed"
    fi
    if [[ "$score" == dual-xent ]]; then
        # the backward model gets the forward scorer's budget: --warmup updates under --filter-scorer warmup
        local bupd="$MAX_UPDATE"; [[ "$src" == none && "$FILTER_SCORER" == warmup ]] && bupd="$WARMUP"
        bdir="$RUNS/$cond/backward$bupd/seed$seed"
        if ! grep -q "done training" "$bdir/train.log" 2>/dev/null; then
            log "$cond/backward$bupd/seed$seed: training the target->source model for dual-xent ($bupd updates) -> $bdir"
            mkdir -p "$bdir"
            # shellcheck disable=SC2086
            "$ROOT/scripts/train_translation.sh" none "$data" "$bdir" --preset "$PRESET" --seed "$seed" \
                --max-update "$bupd" --threads "$THREADS" ${GPU:+--gpu} --source-lang en --target-lang de \
                $TRAIN_ARGS > "$bdir/train.stdout" 2>&1 || die "training $cond/backward/seed$seed failed"
        fi
        extra=(--backward-path "$bdir/checkpoint_last.pt")
    fi
    mkdir -p "$dir"
    log "$cond/$method/seed$seed: scoring the train split ($score) and keeping the best $FILTER_KEEP"
    local t0; t0=$(date +%s)
    python -m fairseq_reweight.score "$data" --path "$ck" --score "$score" "${extra[@]}" --out "$dir/scores.tsv" \
        --keep "$FILTER_KEEP" --keep-list "$dir/keep.txt" --no-progress ${GPU:+} $( [[ -z "$GPU" ]] && echo --cpu ) \
        > "$dir/score.stdout" 2>&1 || { tail -20 "$dir/score.stdout" >&2; die "scoring for $cond/$method/seed$seed failed"; }
    echo "{\"score_seconds\": $(( $(date +%s) - t0 ))${bdir:+, \"backward_dir\": \"$bdir\"}}" > "$dir/score_time.json"
    python - "$dir/scores.tsv" "$data/train.flags" "$dir/filter_analysis.json" <<'PY'
import json, sys
import numpy as np
sys.path.insert(0, "")
from fairseq_reweight.core import auc
s = np.loadtxt(sys.argv[1], skiprows=1, usecols=1)
f = np.loadtxt(sys.argv[2]).astype(int)
json.dump({"auc": auc(s, 1 - f)}, open(sys.argv[3], "w"))
PY
    python "$ROOT/scripts/mt_helpers.py" subset --data "$data" --keep "$dir/keep.txt" \
        --out "$(filter_data "$cond" "$method" "$seed")" > /dev/null
}
warmup_dir() { echo "$RUNS/$1/warmup$WARMUP/seed$2"; }
# the shared plain prefix of one condition and seed (trained once; flock: two workers may need it at once)
ensure_warmup() {  # COND SEED
    local cond="$1" seed="$2" wdir data
    wdir=$(warmup_dir "$cond" "$seed"); data=$(data_of "$cond" none)
    mkdir -p "$wdir"
    (
        flock 9
        if [[ -f "$wdir/checkpoint_last.pt" ]] && grep -q "done training" "$wdir/train.log" 2>/dev/null; then
            exit 0
        fi
        log "$cond/warmup$WARMUP/seed$seed: training the shared plain prefix ($WARMUP updates) -> $wdir"
        # shellcheck disable=SC2086
        "$ROOT/scripts/train_translation.sh" none "$data" "$wdir" --preset "$PRESET" --seed "$seed" \
            --max-update "$WARMUP" --threads "$THREADS" ${GPU:+--gpu} $TRAIN_ARGS > "$wdir/train.stdout" 2>&1 \
            || { tail -30 "$wdir/train.stdout" >&2; die "warm-up $cond/seed$seed failed (log: $wdir/train.stdout)"; }
    ) 9> "$wdir/.lock"
}
finished() {  # COND METHOD SEED
    local d; d=$(run_dir "$@")
    [[ -f "$d/checkpoint_last.pt" && -f "$d/bleu_test.json" ]] && grep -q "done training" "$d/train.log" 2>/dev/null
}

# ------------------------------------------------------------------ one run (also the --jobs worker)
one_run() {
    local cond="$1" method="$2" seed="$3" data dir start_args=() method_args=() train_method="$2"
    data=$(data_of "$cond" "$method" "$seed"); dir=$(run_dir "$cond" "$method" "$seed")
    if [[ "$method" == perfect ]]; then
        train_method=none
    elif [[ "$method" == filter-* ]]; then
        train_method=none
        prepare_filter "$cond" "$method" "$seed"
        data=$(data_of "$cond" "$method" "$seed")
    elif [[ "$WARMUP" -gt 0 ]]; then
        ensure_warmup "$cond" "$seed"
        start_args=(--continue-once "$(warmup_dir "$cond" "$seed")/checkpoint_last.pt")
    fi
    [[ "$method" == deep && -n "$DEEP_ARGS" ]] && read -r -a method_args <<< "$DEEP_ARGS"
    if finished "$cond" "$method" "$seed"; then
        log "$cond/$method/seed$seed: done before, skipped"
    else
        mkdir -p "$dir"
        if [[ -f "$dir/checkpoint_last.pt" ]] && grep -q "done training" "$dir/train.log" 2>/dev/null; then
            log "$cond/$method/seed$seed: trained before"
        else
            log "$cond/$method/seed$seed: training ($MAX_UPDATE updates, preset $PRESET) -> $dir"
            # shellcheck disable=SC2086
            "$ROOT/scripts/train_translation.sh" "$train_method" "$data" "$dir" --preset "$PRESET" --seed "$seed" \
                --max-update "$MAX_UPDATE" --threads "$THREADS" ${GPU:+--gpu} $TRAIN_ARGS "${start_args[@]}" \
                "${method_args[@]}" > "$dir/train.stdout" 2>&1 \
                || { tail -30 "$dir/train.stdout" >&2; die "training $cond/$method/seed$seed failed (log: $dir/train.stdout)"; }
        fi
        log "$cond/$method/seed$seed: evaluating BLEU on test_2016_flickr"
        "$ROOT/scripts/eval_bleu.sh" "$data" "$dir/checkpoint_last.pt" --split test $EVAL_DEV --threads "$THREADS" \
            > "$dir/eval.stdout" 2>&1 \
            || { tail -30 "$dir/eval.stdout" >&2; die "evaluation of $cond/$method/seed$seed failed (log: $dir/eval.stdout)"; }
        grep -E "^(BLEU|chrF) =" "$dir/eval.stdout" | sed "s|^|  $cond/$method/seed$seed: |" >&2 || true
    fi
    if [[ "$cond" == noisy && "$method" != perfect && "$method" != filter-* && ! -f "$dir/weights_analysis.json" \
          && -f "$dir/weights.tsv" ]]; then
        python "$ROOT/scripts/analyze_weights.py" --weights "$dir/weights.tsv" --flags "$data/train.flags" \
            --checkpoint "$dir/checkpoint_last.pt" --out-dir "$dir" --label "$method, seed $seed" > "$dir/analyze.stdout" 2>&1 \
            || { tail -20 "$dir/analyze.stdout" >&2; die "weight analysis of $cond/$method/seed$seed failed"; }
        grep -E "^AUC \(last" "$dir/analyze.stdout" | head -1 | sed "s|^|  $cond/$method/seed$seed: |" >&2 || true
    fi
}

if [[ -n "$ONE" ]]; then
    # shellcheck disable=SC2086
    one_run $ONE
    exit 0
fi

# ------------------------------------------------------------------ plan
RUN_LIST=()
if [[ "$JOBS" -le 1 ]]; then  # seed by seed: a stopped benchmark leaves complete tables for the first seeds
    for seed in $SEEDS; do for cond in $CONDITIONS; do for method in $METHODS; do
        [[ ( "$method" == perfect || "$method" == filter-* ) && "$cond" != noisy ]] || RUN_LIST+=("$cond $method $seed")
    done; done; done
else  # the seeds of one method side by side: equal load on the runs timed together
    for cond in $CONDITIONS; do for method in $METHODS; do for seed in $SEEDS; do
        [[ ( "$method" == perfect || "$method" == filter-* ) && "$cond" != noisy ]] || RUN_LIST+=("$cond $method $seed")
    done; done; done
fi
todo=0
for r in "${RUN_LIST[@]}"; do
    # shellcheck disable=SC2086
    finished $r || todo=$((todo + 1))
done
log "${#RUN_LIST[@]} runs (${todo} to do): seeds [$SEEDS] x conditions [$CONDITIONS] x methods [$METHODS]," \
    "$MAX_UPDATE updates, preset $PRESET; runs in $RUNS"
if [[ -n "$DRY" ]]; then
    for r in "${RUN_LIST[@]}"; do
        # shellcheck disable=SC2086
        if finished $r; then echo "done  $r"; else echo "todo  $r"; fi
    done
    exit 0
fi

report() {
    python "$ROOT/scripts/benchmark_report.py" --runs-dir "$RUNS" --results-dir "$RESULTS" --seeds "$SEEDS" \
        --methods "$METHODS" --conditions "$CONDITIONS" --noise "$NOISE" --noise-rate "$RATE" \
        --preset "$PRESET" --max-update "$MAX_UPDATE" --warmup "$WARMUP" --jobs "$JOBS" --threads "$THREADS" --data-clean "$DATA_CLEAN" --data-noisy "$DATA_NOISY" \
        --command "scripts/run_multi30k_benchmark.sh $*" ${CARRY:+--carry "$CARRY"}
}
# --carry: the results recorded in the results folder stand in for runs that are not on this machine (a fresh
# checkout); copied first, as the report rewrites that file
if [[ -n "$CARRY" ]]; then
    [[ -f "$RESULTS/results.json" ]] || die "--carry: no $RESULTS/results.json to carry"
    cp "$RESULTS/results.json" "$RUNS/carried_results.json"; CARRY="$RUNS/carried_results.json"
fi
ARGS_STR="--seeds \"$SEEDS\" --max-update $MAX_UPDATE --warmup $WARMUP${DEEP_ARGS:+ --deep-args \"$DEEP_ARGS\"} --preset $PRESET --noise $NOISE --noise-rate $RATE --jobs $JOBS --threads $THREADS${TRAIN_ARGS:+ --train-args \"$TRAIN_ARGS\"}${GPU:+ --gpu}"
if [[ -n "$REPORT_ONLY" ]]; then
    report "$ARGS_STR"
    exit 0
fi

# ------------------------------------------------------------------ data
start=$(date +%s)
for cond in $CONDITIONS; do
    if [[ "$cond" == clean ]]; then
        log "preparing the clean data-bin $DATA_CLEAN"
        "$ROOT/scripts/prepare_multi30k.sh" --src de --tgt en --vocab "$VOCAB" --meta-size "$META" \
            --seed "$DATA_SEED" --out "$DATA_CLEAN" > /dev/null
    else
        log "preparing the noisy data-bin $DATA_NOISY ($NOISE, rate $RATE)"
        "$ROOT/scripts/prepare_multi30k.sh" --src de --tgt en --vocab "$VOCAB" --meta-size "$META" \
            --seed "$DATA_SEED" --noise "$NOISE" --noise-rate "$RATE" --out "$DATA_NOISY" > /dev/null
        if [[ " $METHODS " == *" perfect "* ]]; then
            log "preparing the perfect-weight data-bin $DATA_PERFECT (the clean pairs of $DATA_NOISY)"
            python "$ROOT/scripts/mt_helpers.py" subset --data "$DATA_NOISY" --keep-clean --out "$DATA_PERFECT" > /dev/null
        fi
    fi
done

# ------------------------------------------------------------------ runs
if [[ "$JOBS" -le 1 ]]; then
    k=0
    for r in "${RUN_LIST[@]}"; do
        k=$((k + 1))
        log "run $k/${#RUN_LIST[@]}: $r"
        # shellcheck disable=SC2086
        one_run $r
    done
else
    log "running $JOBS at a time"
    PASS=(--seeds "$SEEDS" --methods "$METHODS" --max-update "$MAX_UPDATE" --warmup "$WARMUP" --deep-args "$DEEP_ARGS" --filter-keep "$FILTER_KEEP" --filter-scorer "$FILTER_SCORER" --preset "$PRESET"
 --noise "$NOISE"
          --noise-rate "$RATE" --vocab "$VOCAB" --meta-size "$META" --data-seed "$DATA_SEED"
          --conditions "$CONDITIONS" --runs-dir "$RUNS" --results-dir "$RESULTS" --train-args "$TRAIN_ARGS"
          --threads "$THREADS" --jobs "$JOBS")
    [[ -n "$GPU" ]] && PASS+=(--gpu)
    printf '%s\n' "${RUN_LIST[@]}" | xargs -P "$JOBS" -I{} "$SELF" "${PASS[@]}" --_one "{}"
fi
log "all runs done in $(( ($(date +%s) - start) / 60 )) min"
report "$ARGS_STR"
