#!/usr/bin/env bash
# The smallest real end-to-end example: Multi30k De->En -> short `deep` reweighted training -> BLEU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    cat <<USAGE
Usage: scripts/quickstart.sh [--updates N] [--out DIR]

Prepares Multi30k De->En (raw files from \$MULTI30K_DIR, else ../shared/data/multi30k next to the
checkout, else downloaded), trains the tiny-cpu transformer with the deep-interaction teacher for
N updates (default 600; with data preparation about 15 minutes on 2 CPU cores; reweighting starts after update 200), and prints test_2016_flickr BLEU/chrF.
Outputs: data-bin/multi30k_de_en (data) and DIR (default runs/quickstart: checkpoints, train.log,
weights.tsv, bleu_test.json). Re-running resumes/skips finished steps.
USAGE
}
UPDATES=600 OUT="$ROOT/runs/quickstart"
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --updates) UPDATES="${2:?--updates needs a value}"; shift 2 ;;
        --out) OUT="${2:?--out needs a value}"; shift 2 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
DATA="$ROOT/data-bin/multi30k_de_en"
echo "== 1/3 prepare Multi30k De->En -> $DATA"
bash "$ROOT/scripts/prepare_multi30k.sh" --src de --tgt en --out "$DATA"
echo "== 2/3 train: deep teacher, $UPDATES updates -> $OUT"
bash "$ROOT/scripts/train_translation.sh" deep "$DATA" "$OUT" --preset tiny-cpu --max-update "$UPDATES" \
    --reweight-warmup 200
echo "== 3/3 BLEU on test_2016_flickr"
bash "$ROOT/scripts/eval_bleu.sh" "$DATA" "$OUT/checkpoint_last.pt" --split test --cpu
