#!/usr/bin/env bash
# IWSLT'14 De-En (fairseq's recipe) -> sentencepiece -> data-bin with train/valid/test/meta (+ optional noise).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEFAULT_URL="http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"

usage() {
    cat <<EOF
Usage: scripts/prepare_iwslt14.sh [options]

The standard IWSLT'14 De-En recipe of fairseq's examples/translation/prepare-iwslt14.sh:
  download de-en.tgz -> drop the <url>/<talkid>/<keywords> lines and the <title>/<description> tags of
  train.tags.de-en.* -> (--tok moses: Moses tokenisation + lowercasing) -> clean pairs (1..175 tokens,
  length ratio <= 1.5) -> valid = every 23rd train pair -> test = dev2010 + tedx.dev2012 + tst2010-2012
then, like scripts/prepare_multi30k.sh: a clean meta split held out of train, optional noise,
a joint sentencepiece model and the fairseq data-bin (train/valid/test/meta), train.flags, ref/.

Needs a network for the download, unless --raw-dir holds de-en.tgz or its extracted de-en/ folder.

Options:
  --raw-dir DIR       folder with de-en.tgz or de-en/ (default: download into data/iwslt14_raw/)
  --url URL           where to download de-en.tgz (default $DEFAULT_URL)
  --src LANG          de (default) or en
  --tgt LANG          en (default) or de
  --tok spm|moses     spm (default): raw cased text, detokenised sacrebleu against raw references;
                      moses: the recipe's tokenised + lowercased text (needs: pip install sacremoses),
                      BLEU on that tokenised text (sacrebleu --tokenize none), as in the literature
  --vocab N           joint sentencepiece vocabulary size (default 10000)
  --meta-size N       clean pairs held out of train as the meta split (default 1000)
  --seed N            seed of the meta hold-out, the noise and sentencepiece (default 1)
  --noise TYPE        none|misaligned|random-target|copy|token (default none)
  --noise-rate R      fraction of train pairs to corrupt
  --noise-on raw|spm  corrupt the text before (default) or after sentencepiece
  --token-rate R      token noise: per-token edit probability (default 0.1)
  --out DIR           output data-bin (default data-bin/iwslt14_SRC_TGT[_NOISERATE] in the checkout)
  --workers N         fairseq-preprocess workers (default 4)
  -h, --help          this help
EOF
}

die() { echo "error: $*" >&2; exit 2; }
log() { echo "[prepare_iwslt14] $*" >&2; }

SRC=de TGT=en TOK=spm VOCAB=10000 META=1000 SEED=1 NOISE=none RATE=0 NOISE_ON=raw TOKEN_RATE=0.1
RAW_DIR="" URL="$DEFAULT_URL" OUT="" WORKERS=4
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --raw-dir) RAW_DIR="${2:?--raw-dir needs a value}"; shift 2 ;;
        --url) URL="${2:?--url needs a value}"; shift 2 ;;
        --src) SRC="${2:?--src needs a value}"; shift 2 ;;
        --tgt) TGT="${2:?--tgt needs a value}"; shift 2 ;;
        --tok) TOK="${2:?--tok needs a value}"; shift 2 ;;
        --vocab) VOCAB="${2:?--vocab needs a value}"; shift 2 ;;
        --meta-size) META="${2:?--meta-size needs a value}"; shift 2 ;;
        --seed) SEED="${2:?--seed needs a value}"; shift 2 ;;
        --noise) NOISE="${2:?--noise needs a value}"; shift 2 ;;
        --noise-rate) RATE="${2:?--noise-rate needs a value}"; shift 2 ;;
        --noise-on) NOISE_ON="${2:?--noise-on needs a value}"; shift 2 ;;
        --token-rate) TOKEN_RATE="${2:?--token-rate needs a value}"; shift 2 ;;
        --out) OUT="${2:?--out needs a value}"; shift 2 ;;
        --workers) WORKERS="${2:?--workers needs a value}"; shift 2 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

for l in "$SRC" "$TGT"; do [[ "$l" == de || "$l" == en ]] || die "--src/--tgt must be de or en, got '$l'"; done
[[ "$SRC" != "$TGT" ]] || die "--src and --tgt must differ"
[[ "$TOK" == spm || "$TOK" == moses ]] || die "--tok must be spm or moses, got '$TOK'"
case "$NOISE" in none|misaligned|random-target|copy|token) ;; *) die "unknown --noise '$NOISE'" ;; esac
command -v python >/dev/null || die "python not found: activate the project's environment"
err=$(python -c "import sentencepiece" 2>&1) \
    || die "cannot import the sentencepiece Python package (pip install sentencepiece): ${err##*$'\n'}"
command -v fairseq-preprocess >/dev/null || die "fairseq-preprocess not found: activate the environment with fairseq"
if [[ "$TOK" == moses ]]; then
    python -c "import sacremoses" 2>/dev/null || die "--tok moses needs sacremoses: pip install sacremoses"
fi
if [[ -z "$OUT" ]]; then
    OUT="$ROOT/data-bin/iwslt14_${SRC}_${TGT}"
    [[ "$TOK" == spm ]] || OUT="${OUT}_${TOK}"
    [[ "$NOISE" == none ]] || OUT="${OUT}_${NOISE}${RATE}"
fi

# ---------------------------------------------------------------- raw archive
if [[ -z "$RAW_DIR" ]]; then
    RAW_DIR="$ROOT/data/iwslt14_raw"
    mkdir -p "$RAW_DIR"
    if [[ ! -d "$RAW_DIR/de-en" && ! -s "$RAW_DIR/de-en.tgz" ]]; then
        log "downloading $URL -> $RAW_DIR/de-en.tgz"
        if command -v curl >/dev/null; then
            curl -fSL --retry 2 --connect-timeout 20 -o "$RAW_DIR/de-en.tgz.part" "$URL" \
                || die "download of $URL failed (no network?): fetch de-en.tgz elsewhere and pass --raw-dir DIR"
        else
            wget -T 20 -O "$RAW_DIR/de-en.tgz.part" "$URL" \
                || die "download of $URL failed (no network?): fetch de-en.tgz elsewhere and pass --raw-dir DIR"
        fi
        mv "$RAW_DIR/de-en.tgz.part" "$RAW_DIR/de-en.tgz"
    fi
fi
[[ -d "$RAW_DIR" ]] || die "--raw-dir $RAW_DIR not found"
if [[ ! -d "$RAW_DIR/de-en" ]]; then
    [[ -s "$RAW_DIR/de-en.tgz" ]] || die "$RAW_DIR has neither de-en/ nor de-en.tgz"
    log "extracting $RAW_DIR/de-en.tgz"
    tar -xzf "$RAW_DIR/de-en.tgz" -C "$RAW_DIR" || die "cannot extract $RAW_DIR/de-en.tgz"
fi
ORIG="$RAW_DIR/de-en"
for l in de en; do
    [[ -f "$ORIG/train.tags.de-en.$l" ]] || die "missing $ORIG/train.tags.de-en.$l (not an IWSLT'14 de-en archive?)"
done
log "raw IWSLT'14: $ORIG"
log "output: $OUT ($SRC->$TGT, --tok $TOK, vocab $VOCAB, meta $META, seed $SEED, noise $NOISE $RATE)"

# ---------------------------------------------------------------- recipe text -> {train,valid,test}.{de,en}
TXT="$OUT/text/raw"
if [[ -s "$TXT/train.de" && -s "$TXT/train.en" && -s "$TXT/valid.de" && -s "$TXT/test.en" ]]; then
    log "recipe text: exists, skipped"
else
    mkdir -p "$TXT"
    python "$ROOT/scripts/mt_helpers.py" iwslt-text --orig "$ORIG" --out "$TXT" --src de --tgt en --tok "$TOK"
fi

BLEU_TOK=13a
[[ "$TOK" == moses ]] && BLEU_TOK=none
python "$ROOT/scripts/mt_helpers.py" build --raw-dir "$TXT" --out "$OUT" --src "$SRC" --tgt "$TGT" \
    --vocab "$VOCAB" --meta-size "$META" --seed "$SEED" --noise "$NOISE" --noise-rate "$RATE" \
    --noise-on "$NOISE_ON" --token-rate "$TOKEN_RATE" --workers "$WORKERS" --bleu-tokenize "$BLEU_TOK"
echo "$OUT"
