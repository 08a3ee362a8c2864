#!/usr/bin/env bash
# fairseq-train with the reweighted_translation plugin, for one method and one preset.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    cat <<EOF
Usage: scripts/train_translation.sh METHOD DATA-BIN SAVE-DIR [options] [extra fairseq-train args...]

Trains a transformer with --task reweighted_translation and --reweight-method METHOD.

  METHOD     none | l2rw | mwnet | deep
  DATA-BIN   a data-bin with train/valid and (except for none) a clean meta split, e.g. from
             scripts/prepare_multi30k.sh
  SAVE-DIR   checkpoints, train.log (the full log), weights.tsv (--dump-weights), train_cmd.txt

Options:
  --preset P        small-cpu: the competent CPU student for Multi30k (plain fairseq transformer, 2+2
                    layers, d=256, FFN 1024, 4 heads, no shared embeddings, 4096-token batches, lr 1e-3
                    inverse_sqrt with 400 warm-up updates, dropout 0.3, 1060 updates = 8 epochs of
                    Multi30k), one thread; see the README for its measured BLEU and speed.
                    tiny-cpu (default, for tests and smoke runs): 3+3-layer transformer, 128-dim embeddings (shared), 512-dim FFN,
                    1024-token batches, 1200 updates, on the CPU with one thread. Measured on this
                    project's 2-core machine (1 thread each): none 0.27, l2rw 0.65, mwnet 0.75,
                    deep 0.80 s/update; none reaches ~17 BLEU on Multi30k test_2016_flickr after
                    700 updates.
                    iwslt: the paper-scale transformer_iwslt_de_en (GPU), 4096-token batches,
                    lr 5e-4, 4000 warm-up updates, 50000 updates
  --seed N          random seed (default 1)
  --max-update N    override the preset's number of updates
  --teacher-lr LR   teacher learning rate for mwnet/deep (default: the task's, see --reweight-recipe)
  --gpu             train on the GPU (drops the tiny-cpu preset's --cpu)
  --threads N       CPU threads of torch (OMP/MKL_NUM_THREADS; default: \$OMP_NUM_THREADS, else 1 with
                    the *-cpu presets). One thread per run is the safe choice: on a 2-core machine that is also
                    running anything else, 2 OpenMP threads made an update 10-25x slower (spin-waiting);
                    to use both cores run two trainings at once (run_multi30k_benchmark.sh --jobs 2)
  --dry-run         print the fairseq-train command and exit
  -h, --help        this help
Any other argument is passed on to fairseq-train after the preset's arguments (so it overrides
them, e.g. --max-tokens 1024 or --lr 5e-4).

Always passed: --required-batch-size-multiple 1 (fairseq's default 8 makes batch_by_size drop the
last batch of every epoch when its size is not a multiple of 8, so a few of the longest train
sentences would never be trained on nor get a weight, and a few validation sentences not scored).

Re-running with the same SAVE-DIR resumes from SAVE-DIR/checkpoint_last.pt (fairseq's default);
rows of weights.tsv for updates after that checkpoint are then written twice (analyze_weights.py
keeps the last).
EOF
}

die() { echo "error: $*" >&2; exit 2; }

for a in "$@"; do [[ "$a" == -h || "$a" == --help ]] && { usage; exit 0; }; done
[[ $# -ge 3 ]] || { usage >&2; die "expected METHOD DATA-BIN SAVE-DIR"; }
METHOD="$1" DATA="$2" SAVE="$3"
shift 3
PRESET=tiny-cpu SEED=1 MAX_UPDATE="" TEACHER_LR="" DRY=0 GPU="" THREADS="${OMP_NUM_THREADS:-}"
EXTRA=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --preset) PRESET="${2:?--preset needs a value}"; shift 2 ;;
        --seed) SEED="${2:?--seed needs a value}"; shift 2 ;;
        --max-update) MAX_UPDATE="${2:?--max-update needs a value}"; shift 2 ;;
        --teacher-lr) TEACHER_LR="${2:?--teacher-lr needs a value}"; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        --gpu) GPU=1; shift ;;
        --threads) THREADS="${2:?--threads needs a value}"; shift 2 ;;
        --) shift; EXTRA+=("$@"); break ;;
        *) EXTRA+=("$1"); shift ;;
    esac
done

case "$METHOD" in none|l2rw|mwnet|deep) ;; *) die "METHOD must be none, l2rw, mwnet or deep, got '$METHOD'" ;; esac
[[ -d "$DATA" ]] || die "data-bin '$DATA' not found (run scripts/prepare_multi30k.sh first)"
ls "$DATA"/train.*.idx >/dev/null 2>&1 || die "'$DATA' has no binarized train split (train.*.idx)"
ls "$DATA"/valid.*.idx >/dev/null 2>&1 || die "'$DATA' has no binarized valid split (valid.*.idx)"
if [[ "$METHOD" != none ]]; then
    ls "$DATA"/meta.*.idx >/dev/null 2>&1 \
        || die "'$DATA' has no clean meta split (meta.*.idx), which --reweight-method $METHOD needs: prepare the data with scripts/prepare_multi30k.sh"
fi

case "$PRESET" in
    tiny-cpu)
        PRESET_ARGS=(--arch transformer --encoder-layers 3 --decoder-layers 3
            --encoder-embed-dim 128 --decoder-embed-dim 128 --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512
            --encoder-attention-heads 4 --decoder-attention-heads 4 --share-all-embeddings
            --dropout 0.2 --attention-dropout 0.1 --weight-decay 0.0001
            --optimizer adam --adam-betas "(0.9, 0.98)" --clip-norm 1.0
            --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 300 --warmup-init-lr 1e-07
            --max-tokens 1024 --max-update 1200 --cpu --num-workers 0
            --log-interval 25)
        ;;
    small-cpu)
        PRESET_ARGS=(--arch transformer --encoder-layers 2 --decoder-layers 2
            --encoder-embed-dim 256 --decoder-embed-dim 256 --encoder-ffn-embed-dim 1024 --decoder-ffn-embed-dim 1024
            --encoder-attention-heads 4 --decoder-attention-heads 4
            --dropout 0.3 --weight-decay 0.0001
            --optimizer adam --adam-betas "(0.9, 0.98)" --clip-norm 0.0
            --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 400
            --max-tokens 4096 --max-update 1060 --cpu --num-workers 0
            --log-interval 25)
        ;;
    iwslt)
        PRESET_ARGS=(--arch transformer_iwslt_de_en --share-decoder-input-output-embed
            --dropout 0.3 --weight-decay 0.0001
            --optimizer adam --adam-betas "(0.9, 0.98)" --clip-norm 0.0
            --lr 5e-4 --lr-scheduler inverse_sqrt --warmup-updates 4000 --warmup-init-lr 1e-07
            --max-tokens 4096 --max-update 50000 --num-workers 2
            --log-interval 100)
        ;;
    *) die "unknown --preset '$PRESET' (tiny-cpu | small-cpu | iwslt)" ;;
esac
if [[ "$PRESET" == tiny-cpu ]]; then
    # --share-all-embeddings needs one joined dictionary (scripts/prepare_*.sh write one)
    dicts=("$DATA"/dict.*.txt)
    if [[ ${#dicts[@]} -ne 2 ]] || ! cmp -s "${dicts[0]}" "${dicts[1]}"; then
        echo "[train] $DATA has separate source/target dictionaries: sharing only the decoder embeddings" >&2
        PRESET_ARGS=("${PRESET_ARGS[@]/--share-all-embeddings/--share-decoder-input-output-embed}")
    fi
fi

METHOD_ARGS=(--reweight-method "$METHOD")
if [[ "$METHOD" != none ]]; then
    METHOD_ARGS+=(--meta-subset meta --meta-interval 1 --meta-grad fast)
fi
if [[ -n "$TEACHER_LR" && ( "$METHOD" == mwnet || "$METHOD" == deep ) ]]; then
    METHOD_ARGS+=(--teacher-lr "$TEACHER_LR")
fi
[[ -n "$MAX_UPDATE" ]] && PRESET_ARGS+=(--max-update "$MAX_UPDATE")
if [[ -n "$GPU" ]]; then
    ARGS=()
    for a in "${PRESET_ARGS[@]}"; do [[ "$a" == --cpu ]] || ARGS+=("$a"); done
    PRESET_ARGS=("${ARGS[@]}")
fi

CMD=(fairseq-train "$DATA" --user-dir "$ROOT/fairseq_reweight" --task reweighted_translation
    --criterion reweighted_label_smoothed_cross_entropy --label-smoothing 0.1
    "${METHOD_ARGS[@]}" "${PRESET_ARGS[@]}"
    --seed "$SEED" --save-dir "$SAVE" --no-epoch-checkpoints --dump-weights "$SAVE/weights.tsv"
    --log-format simple --skip-invalid-size-inputs-valid-test --required-batch-size-multiple 1
    "${EXTRA[@]}")

if [[ -z "$THREADS" && "$PRESET" == *-cpu && -z "$GPU" ]]; then
    THREADS=1
fi
if [[ -n "$THREADS" ]]; then
    [[ "$THREADS" =~ ^[1-9][0-9]*$ ]] || die "--threads must be a positive integer, got '$THREADS'"
    export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
fi

if [[ "$DRY" == 1 ]]; then
    [[ -z "$THREADS" ]] || echo -n "OMP_NUM_THREADS=$THREADS "
    printf '%q ' "${CMD[@]}"; echo
    exit 0
fi
command -v fairseq-train >/dev/null || die "fairseq-train not found: activate the environment with fairseq"
mkdir -p "$SAVE"
printf '%q ' "${CMD[@]}" > "$SAVE/train_cmd.txt"; echo >> "$SAVE/train_cmd.txt"
echo "[train] $METHOD, preset $PRESET, seed $SEED, ${THREADS:-default} CPU thread(s) -> $SAVE (log: $SAVE/train.log)" >&2
start=$(date +%s.%N)
"${CMD[@]}" 2>&1 | tee -a "$SAVE/train.log"
end=$(date +%s.%N)
python - "$SAVE" "$start" "$end" <<'EOF'
import json, sys
save, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
with open(f"{save}/train_time.json", "w") as f:
    json.dump({"wall_seconds": round(end - start, 2)}, f)
    f.write("\n")
EOF
echo "[train] done in $(python -c "print(round($end-$start))")s: $SAVE/checkpoint_last.pt" >&2
