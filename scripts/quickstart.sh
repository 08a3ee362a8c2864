#!/usr/bin/env bash
# The main job: what reweighting buys on noisy Multi30k. Plain training and `deep` (its defaults) side by
# side on 30 % misaligned De->En pairs, then BLEU of both, the teacher's AUC against the noise flags and
# the weight histogram.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    cat <<USAGE
Usage: scripts/quickstart.sh [--updates N] [--out DIR] [--preset P]

Prepares Multi30k De->En with 30 % of the training pairs misaligned (a clean 1,000-pair meta split held
out first; raw files from \$MULTI30K_DIR, else ../shared/data/multi30k next to the checkout, else
downloaded), trains plain fairseq (--reweight-method none) and --reweight-method deep with its defaults
side by side (one CPU thread each; the same preset, seed and number of updates), and prints
test_2016_flickr BLEU/chrF of both, the weight AUC of deep's teacher against the noise flags (last 20 %
of updates) and where the weight histogram is.

Defaults: the tiny-cpu preset (3+3-layer transformer, d=128: the shorter preset, so that the whole job
takes about 10 minutes on 2 CPU cores), N = 1200 updates. --preset small-cpu (the competent student of
the README's results) takes about 1.5 hours.
Outputs: data-bin/multi30k_de_en_misaligned0.3 and DIR (default runs/quickstart): none/ and deep/ with
checkpoints, train.log, weights.tsv, bleu_test.json, weights_hist.png. Re-running resumes/skips finished
steps.
USAGE
}
UPDATES=1200 OUT="$ROOT/runs/quickstart" PRESET=tiny-cpu
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --updates) UPDATES="${2:?--updates needs a value}"; shift 2 ;;
        --out) OUT="${2:?--out needs a value}"; shift 2 ;;
        --preset) PRESET="${2:?--preset needs a value}"; shift 2 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ "$UPDATES" =~ ^[1-9][0-9]*$ ]] || { echo "error: --updates must be a positive number" >&2; exit 2; }
DATA="$ROOT/data-bin/multi30k_de_en_misaligned0.3"
start=$(date +%s)
echo "== 1/4 prepare Multi30k De->En, 30 % of the train pairs misaligned -> $DATA"
bash "$ROOT/scripts/prepare_multi30k.sh" --src de --tgt en --noise misaligned --noise-rate 0.3 --out "$DATA" > /dev/null

echo "== 2/4 train none and deep side by side ($UPDATES updates, preset $PRESET, one thread each)"
pids=()
for m in none deep; do
    if [[ -f "$OUT/$m/checkpoint_last.pt" ]] && grep -q "done training" "$OUT/$m/train.log" 2>/dev/null; then
        echo "   $m: trained before"
        continue
    fi
    mkdir -p "$OUT/$m"
    bash "$ROOT/scripts/train_translation.sh" "$m" "$DATA" "$OUT/$m" --preset "$PRESET" --max-update "$UPDATES" \
        --threads 1 > "$OUT/$m/train.stdout" 2>&1 &
    pids+=($!)
    echo "   $m: training, log $OUT/$m/train.log"
done
while [[ ${#pids[@]} -gt 0 ]]; do  # progress: the last update each run logged
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    line=""
    for m in none deep; do
        u=$(grep -o "num_updates=[0-9]*" "$OUT/$m/train.log" 2>/dev/null | tail -1 | cut -d= -f2 || true)
        line+="$m ${u:-0}/$UPDATES   "
    done
    echo -ne "\r   $line"
    [[ $alive == 1 ]] || break
    sleep 15
done
echo
for p in "${pids[@]:-}"; do
    [[ -n "$p" ]] || continue
    wait "$p" || { echo "error: a training failed; see $OUT/*/train.stdout" >&2; exit 1; }
done

echo "== 3/4 BLEU on test_2016_flickr"
for m in none deep; do
    [[ -f "$OUT/$m/bleu_test.json" ]] || bash "$ROOT/scripts/eval_bleu.sh" "$DATA" "$OUT/$m/checkpoint_last.pt" \
        --split test --cpu --threads 1 > "$OUT/$m/eval.stdout" 2>&1 &
done
wait
echo "== 4/4 the teacher's weights against the noise flags"
python "$ROOT/scripts/analyze_weights.py" --weights "$OUT/deep/weights.tsv" --flags "$DATA/train.flags" \
    --checkpoint "$OUT/deep/checkpoint_last.pt" --out-dir "$OUT/deep" --label "deep" > "$OUT/deep/analyze.stdout"
python - "$OUT" "$start" <<'EOF'
import json, sys, time
out, start = sys.argv[1], float(sys.argv[2])
b = {m: json.load(open(f"{out}/{m}/bleu_test.json")) for m in ("none", "deep")}
a = json.load(open(f"{out}/deep/weights_analysis.json"))
print(f"\n{'':<6}{'BLEU':>8}{'chrF':>8}")
for m in ("none", "deep"):
    print(f"{m:<6}{b[m]['bleu']:>8.2f}{b[m]['chrf']:>8.2f}")
print(f"\ndeep - none: {b['deep']['bleu'] - b['none']['bleu']:+.2f} BLEU, {b['deep']['chrf'] - b['none']['chrf']:+.2f} chrF")
print(f"teacher's weight AUC, clean vs misaligned pairs (last 20 % of updates): {a['auc_last']:.3f} "
      f"(the student's -loss alone: {a['auc_last_neg_loss']:.3f}); mean weight clean {a['mean_w_clean_last']:.2f}, "
      f"misaligned {a['mean_w_corrupted_last']:.2f}")
if "auc_last_with_left_out" in a:
    print(f"with the pairs --drop-below left out at weight 0: AUC {a['auc_last_with_left_out']:.3f} (left out: "
          f"{a['left_out_corrupted']} misaligned, {a['left_out_clean']} clean pairs)")
print(f"weight histogram: {out}/deep/weights_hist.png; AUC over training: {out}/deep/weights_auc.png")
print(f"BLEU signature: {b['deep']['bleu_signature']}")
print(f"total {int(time.time() - start) // 60} min")
EOF
