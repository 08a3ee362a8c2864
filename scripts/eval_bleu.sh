#!/usr/bin/env bash
# fairseq-generate (beam 5) -> hypotheses in the original order -> spm decoding -> sacrebleu BLEU + chrF.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    cat <<EOF
Usage: scripts/eval_bleu.sh DATA-BIN CHECKPOINT [options]

Translates a split of DATA-BIN with CHECKPOINT (fairseq-generate, beam 5), puts the hypotheses back
in the split's original order, decodes the sentencepiece pieces and scores the detokenised text
with sacrebleu (BLEU and chrF, with their signatures) against the raw reference.

Options:
  --split S        data-bin split to translate (default test)
  --raw-ref FILE   raw (untokenised) reference (default DATA-BIN/ref/S.TGT, written by
                   scripts/prepare_multi30k.sh)
  --spm MODEL      sentencepiece model (default DATA-BIN/spm.model; 'none' to score the output as is)
  --beam N         beam size (default 5)
  --max-tokens N   generation batch size in tokens (default 4096)
  --out-dir DIR    where to write gen_S.txt, hyp_S.txt and bleu_S.json (default: the checkpoint's folder)
  --cpu            generate on the CPU (default: CPU unless a GPU is visible to torch)
  --threads N      CPU threads (default: \$OMP_NUM_THREADS, else 1 on the CPU; see train_translation.sh)
  -h, --help       this help
Any other argument is passed on to fairseq-generate. --required-batch-size-multiple 1 is always
passed: with fairseq's default of 8, batch_by_size drops the last batch when its size is not a
multiple of 8, and up to 7 test sentences would silently go untranslated (fairseq issue #5036).

Prints the BLEU and chrF scores with the sacrebleu signatures, and writes them to OUT-DIR/bleu_S.json.
EOF
}

die() { echo "error: $*" >&2; exit 2; }

for a in "$@"; do [[ "$a" == -h || "$a" == --help ]] && { usage; exit 0; }; done
[[ $# -ge 2 ]] || { usage >&2; die "expected DATA-BIN CHECKPOINT"; }
DATA="$1" CKPT="$2"
shift 2
SPLIT=test REF="" SPM="" BEAM=5 MAX_TOKENS=4096 OUT_DIR="" CPU="" THREADS="${OMP_NUM_THREADS:-}"
EXTRA=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --split) SPLIT="${2:?--split needs a value}"; shift 2 ;;
        --raw-ref) REF="${2:?--raw-ref needs a value}"; shift 2 ;;
        --spm) SPM="${2:?--spm needs a value}"; shift 2 ;;
        --beam) BEAM="${2:?--beam needs a value}"; shift 2 ;;
        --max-tokens) MAX_TOKENS="${2:?--max-tokens needs a value}"; shift 2 ;;
        --out-dir) OUT_DIR="${2:?--out-dir needs a value}"; shift 2 ;;
        --cpu) CPU=1; shift ;;
        --threads) THREADS="${2:?--threads needs a value}"; shift 2 ;;
        *) EXTRA+=("$1"); shift ;;
    esac
done

[[ -d "$DATA" ]] || die "data-bin '$DATA' not found"
[[ -f "$CKPT" ]] || die "checkpoint '$CKPT' not found"
IDX=$(ls "$DATA"/"$SPLIT".*-*.*.idx 2>/dev/null | head -1 || true)
[[ -n "$IDX" ]] || die "'$DATA' has no binarized split '$SPLIT' ($SPLIT.SRC-TGT.*.idx)"
PAIR=$(basename "$IDX" | cut -d. -f2)     # e.g. de-en
SRC=${PAIR%-*} TGT=${PAIR#*-}
[[ -n "$REF" ]] || REF="$DATA/ref/$SPLIT.$TGT"
[[ -f "$REF" ]] || die "raw reference '$REF' not found (give one with --raw-ref)"
if [[ -z "$SPM" ]]; then
    SPM="$DATA/spm.model"
    [[ -f "$SPM" ]] || die "no sentencepiece model at $SPM: give --spm MODEL, or --spm none to score the output as is"
elif [[ "$SPM" != none && ! -f "$SPM" ]]; then
    die "sentencepiece model '$SPM' not found"
fi
TOKENIZE=13a
if [[ -f "$DATA/prepare.json" ]]; then
    TOKENIZE=$(python -c "import json,sys; print(json.load(open(sys.argv[1])).get('bleu_tokenize', '13a'))" "$DATA/prepare.json")
fi
[[ -n "$OUT_DIR" ]] || OUT_DIR=$(dirname "$CKPT")
mkdir -p "$OUT_DIR"
command -v fairseq-generate >/dev/null || die "fairseq-generate not found: activate the environment with fairseq"
if [[ -z "$CPU" ]] && ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    CPU=1
fi

if [[ -n "$CPU" && -z "$THREADS" ]]; then THREADS=1; fi
if [[ -n "$THREADS" ]]; then export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"; fi

GEN="$OUT_DIR/gen_$SPLIT.txt" HYP="$OUT_DIR/hyp_$SPLIT.txt" JSON="$OUT_DIR/bleu_$SPLIT.json"
echo "[eval] $CKPT on $DATA/$SPLIT ($SRC->$TGT), beam $BEAM -> $GEN" >&2
start=$(date +%s)
fairseq-generate "$DATA" --user-dir "$ROOT/fairseq_reweight" --path "$CKPT" --gen-subset "$SPLIT" \
    --source-lang "$SRC" --target-lang "$TGT" --beam "$BEAM" --max-tokens "$MAX_TOKENS" \
    --required-batch-size-multiple 1 \
    ${CPU:+--cpu} "${EXTRA[@]}" > "$GEN.tmp" 2> "$OUT_DIR/gen_$SPLIT.log" \
    || { tail -20 "$OUT_DIR/gen_$SPLIT.log" >&2; die "fairseq-generate failed (log: $OUT_DIR/gen_$SPLIT.log)"; }
mv "$GEN.tmp" "$GEN"
echo "[eval] generated $(grep -c '^H-' "$GEN") hypotheses in $(( $(date +%s) - start ))s; scoring against $REF" >&2
SPM_ARG=()
[[ "$SPM" == none ]] || SPM_ARG=(--spm "$SPM")
python "$ROOT/scripts/mt_helpers.py" score --gen "$GEN" --ref "$REF" "${SPM_ARG[@]}" --hyp-out "$HYP" \
    --json "$JSON" --tokenize "$TOKENIZE" \
    --extra "$(python -c 'import json,sys; print(json.dumps({"checkpoint": sys.argv[1], "data": sys.argv[2], "split": sys.argv[3], "beam": int(sys.argv[4])}))' "$CKPT" "$DATA" "$SPLIT" "$BEAM")"
echo "[eval] wrote $JSON and $HYP" >&2
