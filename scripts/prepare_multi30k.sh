#!/usr/bin/env bash
# Multi30k task-1 -> sentencepiece -> fairseq data-bin with train/valid/test/meta (+ optional noise).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
URL_BASE="https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw"

usage() {
    cat <<EOF
Usage: scripts/prepare_multi30k.sh [options]

Multi30k task 1 (train 29000 / val 1014 / test_2016_flickr 1000 pairs) -> clean meta split held out
of train -> optional synthetic noise on the remaining train pairs -> joint sentencepiece model ->
fairseq-preprocess data-bin with splits train, valid (val), test (test_2016_flickr) and meta.

Raw files (train|val|test_2016_flickr).(de|en).gz are looked up in --raw-dir, else \$MULTI30K_DIR,
else ../shared/data/multi30k next to the checkout, else downloaded from the multi30k/dataset
GitHub repository into data/multi30k_raw/ (needs a network).

Options:
  --src LANG          source language (de|en, default de)
  --tgt LANG          target language (default en; --src en --tgt de works)
  --vocab N           joint sentencepiece vocabulary size (default 8000)
  --meta-size N       clean pairs held out of train as the meta split (default 1000)
  --seed N            seed of the meta hold-out, the noise and sentencepiece (default 1)
  --noise TYPE        none|misaligned|random-target|copy|token (default none)
  --noise-rate R      fraction of train pairs to corrupt (e.g. 0.3)
  --noise-on raw|spm  corrupt raw text (default) or sentencepiece pieces
  --token-rate R      token noise: per-token edit probability (default 0.1)
  --token-side S      token noise: src|tgt|both (default tgt)
  --raw-dir DIR       folder with the raw .gz files (overrides \$MULTI30K_DIR)
  --out DIR           output data-bin (default data-bin/multi30k_SRC_TGT[_NOISERATE] in the checkout)
  --workers N         fairseq-preprocess workers (default 1)
  -h, --help          this help

Writes into OUT: the data-bin (dict.*.txt, {train,valid,test,meta}.SRC-TGT.*), spm.model,
train.flags (one 0/1 per train sentence id, 1 = corrupted), ref/{valid,test}.{SRC,TGT} (raw
references for eval_bleu.sh), text/ (intermediate text) and prepare.json. Re-running skips the
steps whose outputs exist; a different set of options on the same OUT is an error.
EOF
}

die() { echo "error: $*" >&2; exit 2; }
log() { echo "[prepare_multi30k] $*" >&2; }

SRC=de TGT=en VOCAB=8000 META=1000 SEED=1 NOISE=none RATE=0 NOISE_ON=raw TOKEN_RATE=0.1 TOKEN_SIDE=tgt
RAW_DIR="" OUT="" WORKERS=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --src) SRC="${2:?--src needs a value}"; shift 2 ;;
        --tgt) TGT="${2:?--tgt needs a value}"; shift 2 ;;
        --vocab) VOCAB="${2:?--vocab needs a value}"; shift 2 ;;
        --meta-size) META="${2:?--meta-size needs a value}"; shift 2 ;;
        --seed) SEED="${2:?--seed needs a value}"; shift 2 ;;
        --noise) NOISE="${2:?--noise needs a value}"; shift 2 ;;
        --noise-rate) RATE="${2:?--noise-rate needs a value}"; shift 2 ;;
        --noise-on) NOISE_ON="${2:?--noise-on needs a value}"; shift 2 ;;
        --token-rate) TOKEN_RATE="${2:?--token-rate needs a value}"; shift 2 ;;
        --token-side) TOKEN_SIDE="${2:?--token-side needs a value}"; shift 2 ;;
        --raw-dir) RAW_DIR="${2:?--raw-dir needs a value}"; shift 2 ;;
        --out) OUT="${2:?--out needs a value}"; shift 2 ;;
        --workers) WORKERS="${2:?--workers needs a value}"; shift 2 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

for l in "$SRC" "$TGT"; do [[ "$l" == de || "$l" == en ]] || die "--src/--tgt must be de or en, got '$l'"; done
[[ "$SRC" != "$TGT" ]] || die "--src and --tgt must differ"
case "$NOISE" in
    none) ;;
    misaligned|random-target|copy|token)
        python -c "import sys; r=float(sys.argv[1]); sys.exit(0 if 0<r<1 else 1)" "$RATE" 2>/dev/null \
            || die "--noise $NOISE needs --noise-rate in (0, 1): a rate of 1 leaves no clean pair, got '$RATE'" ;;
    *) die "unknown --noise '$NOISE' (none|misaligned|random-target|copy|token)" ;;
esac
command -v python >/dev/null || die "python not found: activate the project's environment"
err=$(python -c "import sentencepiece" 2>&1) \
    || die "cannot import the sentencepiece Python package (pip install sentencepiece): ${err##*$'\n'}"
command -v fairseq-preprocess >/dev/null || die "fairseq-preprocess not found: activate the environment with fairseq"

if [[ -z "$OUT" ]]; then
    OUT="$ROOT/data-bin/multi30k_${SRC}_${TGT}"
    [[ "$NOISE" == none ]] || OUT="${OUT}_${NOISE}${RATE}"
fi

FILES=(train val test_2016_flickr)
have_raw() { local d="$1"; for f in "${FILES[@]}"; do for l in de en; do [[ -s "$d/$f.$l.gz" ]] || return 1; done; done; }

# ---------------------------------------------------------------- locate (or download) the raw files
if [[ -n "$RAW_DIR" ]]; then
    have_raw "$RAW_DIR" || die "--raw-dir $RAW_DIR lacks some of {train,val,test_2016_flickr}.{de,en}.gz"
elif [[ -n "${MULTI30K_DIR:-}" ]]; then
    RAW_DIR="$MULTI30K_DIR"
    have_raw "$RAW_DIR" || die "MULTI30K_DIR=$RAW_DIR lacks some of {train,val,test_2016_flickr}.{de,en}.gz"
elif have_raw "$ROOT/../shared/data/multi30k"; then
    RAW_DIR="$(cd "$ROOT/../shared/data/multi30k" && pwd)"
else
    RAW_DIR="$ROOT/data/multi30k_raw"
    if ! have_raw "$RAW_DIR"; then
        log "raw Multi30k not found (\$MULTI30K_DIR unset, no ../shared/data/multi30k): downloading to $RAW_DIR"
        mkdir -p "$RAW_DIR"
        for f in "${FILES[@]}"; do
            for l in de en; do
                [[ -s "$RAW_DIR/$f.$l.gz" ]] && continue
                log "  $URL_BASE/$f.$l.gz"
                if command -v curl >/dev/null; then
                    curl -fsSL --retry 2 --connect-timeout 15 -o "$RAW_DIR/$f.$l.gz.part" "$URL_BASE/$f.$l.gz" \
                        || die "download of $URL_BASE/$f.$l.gz failed (no network?). Put the raw Multi30k files in a folder and set MULTI30K_DIR"
                else
                    wget -q -T 15 -O "$RAW_DIR/$f.$l.gz.part" "$URL_BASE/$f.$l.gz" \
                        || die "download of $URL_BASE/$f.$l.gz failed (no network?). Put the raw Multi30k files in a folder and set MULTI30K_DIR"
                fi
                mv "$RAW_DIR/$f.$l.gz.part" "$RAW_DIR/$f.$l.gz"
            done
        done
    fi
fi
log "raw Multi30k: $RAW_DIR"
log "output: $OUT ($SRC->$TGT, vocab $VOCAB, meta $META, seed $SEED, noise $NOISE $RATE)"

# ---------------------------------------------------------------- raw text in the layout mt_helpers.py build expects
RAW_TXT="$OUT/text/raw"
mkdir -p "$RAW_TXT"
declare -A NAME=([train]=train [valid]=val [test]=test_2016_flickr)
for split in train valid test; do
    for l in "$SRC" "$TGT"; do
        dest="$RAW_TXT/$split.$l"
        [[ -s "$dest" ]] && continue
        gzip -dc "$RAW_DIR/${NAME[$split]}.$l.gz" > "$dest.tmp" || die "cannot read $RAW_DIR/${NAME[$split]}.$l.gz"
        mv "$dest.tmp" "$dest"
        log "raw $split.$l: $(wc -l < "$dest") lines"
    done
    n1=$(wc -l < "$RAW_TXT/$split.$SRC"); n2=$(wc -l < "$RAW_TXT/$split.$TGT")
    [[ "$n1" == "$n2" ]] || die "$split: $SRC has $n1 lines but $TGT has $n2"
done

python "$ROOT/scripts/mt_helpers.py" build --raw-dir "$RAW_TXT" --out "$OUT" --src "$SRC" --tgt "$TGT" \
    --vocab "$VOCAB" --meta-size "$META" --seed "$SEED" --noise "$NOISE" --noise-rate "$RATE" \
    --noise-on "$NOISE_ON" --token-rate "$TOKEN_RATE" --token-side "$TOKEN_SIDE" --workers "$WORKERS"
echo "$OUT"
