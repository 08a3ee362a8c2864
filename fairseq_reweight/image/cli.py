"""``python -m fairseq_reweight.image``: train an image classifier on noisy labels with reweighting.

Presets fill in defaults that explicit flags override:

``cpu``    Fashion-MNIST, 40% uniform noise, ResNet-32, 3000 class-balanced training images (+1000 clean
           meta images), 25 epochs (750 updates), lr 0.1 decayed x0.1 at epochs 17 and 21, flips only
           (no random crops: at this budget crops leave the student underfit, so noise barely hurts
           plain training); one method runs in about 10-25 minutes on 2 CPU cores;
``paper``  the MW-Net protocol (Shu et al. 2019, released code) for CIFAR-10/100 (default cifar10,
           resnet32; pick --dataset/--noise/--noise-rate/--arch): batch 100, SGD lr 0.1 momentum 0.9
           weight decay 5e-4, 120 epochs with x0.1 decays at epochs 80 and 100, 1000 clean meta images,
           random crops (4-pixel padding) and flips.
"""

import argparse
import sys
from dataclasses import fields
from typing import List, Optional

from ..core import ReweightConfig, add_arguments
from .data import DATASETS, DataError
from .noise import NOISE_TYPES
from .train import TrainConfig, Trainer

PRESETS = {
    "cpu": dict(dataset="fashion-mnist", noise="uniform", noise_rate=0.4, arch="resnet32", meta_size=1000,
                train_size=3000, epochs=25, lr_steps=[17, 21], batch_size=100, lr=0.1, crop_pad=0),
    "paper": dict(dataset="cifar10", arch="resnet32", epochs=120, lr_steps=[80, 100], batch_size=100, lr=0.1,
                  meta_size=1000, train_size=0, momentum=0.9, weight_decay=5e-4, crop_pad=4),
}


def _int_list(text: str) -> List[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs like 80,100, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m fairseq_reweight.image", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="defaults for a whole experiment (see above)")
    g = p.add_argument_group("data and noise")
    g.add_argument("--dataset", choices=sorted(DATASETS), default=d.dataset)
    g.add_argument("--data-dir", help="dataset directory (default: $CIFAR10_DIR, $CIFAR100_DIR, $FASHION_MNIST_DIR, "
                   "else data/cifar-10-batches-py, data/cifar-100-python, /usr/share/datasets/fashion-mnist)")
    g.add_argument("--download", action="store_true", help="download CIFAR into --data-dir if it is missing")
    g.add_argument("--noise", choices=NOISE_TYPES, default=d.noise,
                   help="uniform: label resampled from all classes; flip: to a fixed other class")
    g.add_argument("--noise-rate", type=float, default=d.noise_rate, help="probability p in [0, 1)")
    g.add_argument("--meta-size", type=int, default=d.meta_size,
                   help="clean class-balanced meta images taken out of the training set")
    g.add_argument("--train-size", type=int, default=d.train_size,
                   help="class-balanced subset of the remaining training images (0: all)")
    g.add_argument("--data-seed", type=int, default=d.data_seed, help="seed of the meta split, subset and noise")
    g.add_argument("--no-augment", dest="augment", action="store_false", help="no random crop/flip")
    g.add_argument("--crop-pad", type=int, default=d.crop_pad, help="random-crop padding in pixels (0: flips only)")
    g = p.add_argument_group("student and optimisation")
    g.add_argument("--arch", default=d.arch, help="resnet32 (resnetN, N=6n+2) or wrn-28-10 (wrn-D-K)")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--lr-steps", type=_int_list, default=d.lr_steps, help="epochs at which the lr decays, e.g. 80,100")
    g.add_argument("--lr-decay", type=float, default=d.lr_decay)
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    # the reweighting flags of the fairseq task, generated from core.config.ReweightConfig
    g = p.add_argument_group("reweighting (as in the fairseq task)")
    add_arguments(g, ReweightConfig, exclude=("meta_precondition",), defaults=d)
    g.add_argument("--teacher-prior", choices=("auto", "none", "loss"), default=d.teacher_prior,
                   help="deep only: the teacher starts from the example's loss (its standardised value times "
                        "--teacher-prior-scale is subtracted from the teacher's logit; the scale is learned); "
                        "auto: the recipe's (tuned: loss; paper: none)")
    g.add_argument("--teacher-prior-scale", type=float, default=d.teacher_prior_scale,
                   help="initial scale of --teacher-prior (default: tuned 0.5)")
    g.add_argument("--weight-ema", type=float, default=d.weight_ema,
                   help="mwnet/deep: average each example's teacher output over its epochs with this decay per "
                        "visit (0: off; default: tuned deep 0.8, otherwise 0)")
    g = p.add_argument_group("run")
    g.add_argument("--save-dir", default=d.save_dir, help="checkpoints, log.json, log.csv, labels.tsv")
    g.add_argument("--resume", action="store_true", help="continue from SAVE_DIR/checkpoint_last.pt")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    g.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: torch's default)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def parse_config(argv: Optional[List[str]] = None) -> TrainConfig:
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.preset:
        parser.set_defaults(**PRESETS[known.preset])
    args = parser.parse_args(argv)
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})


def main(argv: Optional[List[str]] = None) -> dict:
    cfg = parse_config(argv)
    try:
        trainer = Trainer(cfg)
    except (DataError, ValueError, FileNotFoundError) as e:  # settings and data, reported without a traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return trainer.run()
