#!/usr/bin/env bash
# Noisy-label image classification with learned data reweighting (python -m fairseq_reweight.image).
#
#   scripts/train_image.sh cpu [METHOD] [ARGS...]
#       cpu preset: Fashion-MNIST, 40% uniform noise, ResNet-32, ~10-25 min per method on 2 cores
#   scripts/train_image.sh compare [ARGS...]
#       none / mwnet / l2rw / deep on the cpu preset -> examples/image/RESULTS.md (+ PNG plots);
#       re-running skips finished runs and resumes interrupted ones; add --device cuda on a GPU
#   scripts/train_image.sh paper DATASET NOISE RATE ARCH [METHOD] [ARGS...]
#       MW-Net protocol, e.g. `scripts/train_image.sh paper cifar10 uniform 0.4 wrn-28-10 deep`
#   scripts/train_image.sh paper-list
#       print the 16 paper commands (CIFAR-10/100 x uniform 40%, 60%, flip 20%, 40% x ResNet-32, WRN-28-10)
#
# METHOD is none, l2rw, mwnet or deep (default deep); ARGS go to the trainer (see --help), e.g.
# --data-dir, --device cuda, --threads 2, --dump-weights FILE, --resume. Runs land in runs/image/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RUNS=${RUNS:-runs/image}

usage() { sed -n '2,/^set -euo/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

cmd=${1:-}
[ -n "$cmd" ] || usage 1
shift
case "$cmd" in
  cpu)
    method=deep
    if [ $# -gt 0 ] && [[ $1 != -* ]]; then method=$1; shift; fi
    exec "$PY" -m fairseq_reweight.image --preset cpu --reweight-method "$method" \
      --save-dir "$RUNS/cpu-$method" "$@"
    ;;
  compare)
    exec "$PY" -m fairseq_reweight.image.compare --out "$RUNS/compare" "$@"
    ;;
  paper)
    [ $# -ge 4 ] || usage 1
    dataset=$1 noise=$2 rate=$3 arch=$4
    shift 4
    method=deep
    if [ $# -gt 0 ] && [[ $1 != -* ]]; then method=$1; shift; fi
    exec "$PY" -m fairseq_reweight.image --preset paper --dataset "$dataset" --noise "$noise" --noise-rate "$rate" \
      --arch "$arch" --reweight-method "$method" --save-dir "$RUNS/paper-$dataset-$noise$rate-$arch-$method" "$@"
    ;;
  paper-list)
    for dataset in cifar10 cifar100; do
      for noise_rate in "uniform 0.4" "uniform 0.6" "flip 0.2" "flip 0.4"; do
        for arch in resnet32 wrn-28-10; do
          echo "scripts/train_image.sh paper $dataset $noise_rate $arch deep --device cuda"
        done
      done
    done
    ;;
  -h|--help|help) usage ;;
  *) echo "unknown command '$cmd'" >&2; usage 1 ;;
esac
