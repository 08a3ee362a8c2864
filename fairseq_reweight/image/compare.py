"""The evidence run: none / mwnet / l2rw / deep under the same seed and budget, then RESULTS.md.

    python -m fairseq_reweight.image.compare                 # cpu preset, examples/image/RESULTS.md
    python -m fairseq_reweight.image.compare --device cuda   # same runs on a GPU
    python -m fairseq_reweight.image.compare --deep-args "--reweight-recipe paper"   # deep as published

Each method trains with ``python -m fairseq_reweight.image --preset cpu`` (Fashion-MNIST, 40%
uniform noise, ResNet-32) in ``OUT/METHOD``; a finished run is skipped and an interrupted one
resumed, so the command can simply be run again. After every run the report is rewritten:
test accuracy (best and last epoch), the AUC of the weights for clean vs noisy labels (last epoch;
0.5 for uniform weights), seconds per iteration and the ratio to ``none``, and two plots
(accuracy/AUC curves; weight histograms of clean vs noisy examples in the last epoch).
Targets (Fan et al. 2021 vs MW-Net, Shu et al. 2019, and L2RW, Ren et al. 2018): last-epoch
accuracy of ``deep`` >= ``none`` + 3 points and >= ``mwnet``; weight AUC of ``deep`` >= 0.9.
"""

import argparse
import datetime
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..core import METHODS

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_METHODS = ("none", "mwnet", "l2rw", "deep")


def run_method(method: str, out: Path, args, extra: List[str]) -> None:
    run_dir = out / method
    log = run_dir / "log.json"
    if log.is_file() and json.loads(log.read_text())["summary"]["finished"]:
        print(f"[compare] {method}: finished run in {run_dir}, skipped", flush=True)
        return
    cmd = [sys.executable, "-m", "fairseq_reweight.image", "--preset", args.preset, "--reweight-method", method,
           "--save-dir", str(run_dir), "--dump-weights", str(run_dir / "weights.tsv"), "--seed", str(args.seed),
           "--device", args.device, "--threads", str(args.threads)]
    if (run_dir / "checkpoint_last.pt").is_file():
        cmd.append("--resume")
    cmd += extra
    print(f"[compare] {method}: {' '.join(cmd[1:])}", flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    subprocess.run(cmd, check=True, env=env)


def last_epoch_weights(run_dir: Path, log: dict):
    """(weights, noisy flags) of the examples seen in the last epoch, from the weight dump."""
    dump = run_dir / "weights.tsv"
    if not dump.is_file() or not log["epochs"]:
        return None
    epochs = log["epochs"]
    first = epochs[-2]["updates"] if len(epochs) > 1 else 0
    rows = np.loadtxt(dump, delimiter="\t", skiprows=1, ndmin=2)
    rows = rows[rows[:, 0] >= first]
    labels = np.loadtxt(run_dir / "labels.tsv", delimiter="\t", skiprows=1, usecols=(0, 3), dtype=np.int64, ndmin=2)
    noisy = dict(zip(labels[:, 0].tolist(), labels[:, 1].tolist()))
    flags = np.array([noisy[int(i)] for i in rows[:, 1]], dtype=bool)
    return rows[:, 2], flags


def collect(out: Path, methods) -> Dict[str, dict]:
    logs = {}
    for m in methods:
        path = out / m / "log.json"
        if path.is_file():
            logs[m] = json.loads(path.read_text())
    return logs


def plot(logs: Dict[str, dict], out: Path, img_dir: Path) -> List[str]:
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for m, log in logs.items():
        ep = [r["epoch"] for r in log["epochs"]]
        ax1.plot(ep, [r["test_acc"] for r in log["epochs"]], marker="o", ms=3, label=m)
        ax2.plot(ep, [r["weight_auc"] if r["weight_auc"] is not None else np.nan for r in log["epochs"]],
                 marker="o", ms=3, label=m)
    ax1.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    ax2.set(xlabel="epoch", ylabel="AUC", title="weight AUC, clean vs noisy labels", ylim=(0, 1.02))
    ax1.legend(), ax2.legend()
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(img_dir / "accuracy.png", dpi=100)
    plt.close(fig)
    names.append("accuracy.png")

    fig, axes = plt.subplots(1, len(logs), figsize=(3.6 * len(logs), 3.2), squeeze=False)
    for ax, (m, log) in zip(axes[0], logs.items()):
        wf = last_epoch_weights(out / m, log)
        if wf is None:
            continue
        w, noisy = wf
        bins = np.linspace(0, max(float(w.max()), 1.0) * 1.02 + 1e-6, 40)
        ax.hist(w[~noisy], bins=bins, alpha=0.6, density=True, label="clean")
        ax.hist(w[noisy], bins=bins, alpha=0.6, density=True, label="noisy")
        ax.set(title=m, xlabel="weight (last epoch)")
        ax.legend()
    axes[0][0].set_ylabel("density")
    fig.tight_layout()
    fig.savefig(img_dir / "weights.png", dpi=100)
    plt.close(fig)
    names.append("weights.png")
    return names


def _f(v, fmt="{:.2f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def write_report(logs: Dict[str, dict], methods, out: Path, results: Path, command: str) -> None:
    results.parent.mkdir(parents=True, exist_ok=True)
    images = plot(logs, out, results.parent) if logs else []
    none_spi = logs.get("none", {}).get("summary", {}).get("sec_per_iter")
    lines = ["# Image experiments: none / MW-Net / L2RW / deep on noisy labels", "",
             f"Generated by `{command}` on {datetime.date.today().isoformat()}; runs in `{out}`.", ""]
    if logs:
        cfg, s = next(iter(logs.values()))["config"], next(iter(logs.values()))["summary"]
        wrong = 100 * s["wrong_label_fraction"]
        steps = ", ".join(map(str, cfg["lr_steps"]))
        lines += [
            f"Setup: {cfg['dataset']}, {cfg['noise']} noise p = {cfg['noise_rate']} ({wrong:.1f}% of the training "
            f"labels wrong), {s['train_images']} training images, {s['meta_images']} clean meta images, "
            f"{s['test_images']} test images; {cfg['arch']}, {cfg['epochs']} epochs of batch {cfg['batch_size']}, "
            f"SGD lr {cfg['lr']} (x{cfg['lr_decay']} at epochs {steps}), momentum {cfg['momentum']}, weight decay "
            f"{cfg['weight_decay']}, crop padding {cfg['crop_pad']}; seed {cfg['seed']}, data seed {cfg['data_seed']}; "
            f"device {s['device']}, {s['threads']} threads, torch {s['torch']}.", ""]
    lines += ["| method | test acc, best (epoch) | test acc, last | weight AUC (last epoch) | s/iter | x none |",
              "| --- | --- | --- | --- | --- | --- |"]
    for m in methods:
        if m not in logs:
            lines.append(f"| {m} | not run yet | | | | |")
            continue
        s = logs[m]["summary"]
        spi = s["sec_per_iter"]
        ratio = spi / none_spi if spi and none_spi else None
        state = "" if s["finished"] else f" (epoch {s['epochs_done']}/{logs[m]['config']['epochs']}, unfinished)"
        lines.append(f"| {m}{state} | {_f(s['best_test_acc'])} ({s['best_epoch']}) | {_f(s['last_test_acc'])} | "
                     f"{_f(s['last_weight_auc'], '{:.3f}')} | {_f(spi, '{:.3f}')} | {_f(ratio)} |")
    lines += ["", "Targets:"]
    last = {m: logs[m]["summary"]["last_test_acc"] for m in logs}
    checks = []
    if "deep" in last and "none" in last:
        checks.append((f"last-epoch accuracy of deep >= none + 3 ({_f(last['deep'])} vs {_f(last['none'] + 3)})",
                       last["deep"] >= last["none"] + 3))
    if "deep" in last and "mwnet" in last:
        checks.append((f"last-epoch accuracy of deep >= mwnet ({_f(last['deep'])} vs {_f(last['mwnet'])})",
                       last["deep"] >= last["mwnet"]))
    if "deep" in logs:
        a = logs["deep"]["summary"]["last_weight_auc"]
        checks.append((f"weight AUC of deep >= 0.9 ({_f(a, '{:.3f}')})", a is not None and a >= 0.9))
    lines += [f"- [{'x' if ok else ' '}] {text}" for text, ok in checks] or ["- (no runs yet)"]
    lines += ["", "Weight AUC: probability that a random clean-label example gets a larger weight than a random "
              "noisy-label one in the last epoch (ties count 1/2, so uniform weights score 0.5).", ""]
    lines += [f"![{name}]({name})" for name in images]
    results.write_text("\n".join(lines) + "\n")
    print(f"[compare] wrote {results}", flush=True)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fairseq_reweight.image.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/image/compare", help="one run directory per method")
    p.add_argument("--results", default=str(ROOT / "examples/image/RESULTS.md"),
                   help="report to write; the PNG plots go next to it")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated, run in this order")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per run (0: torch's default)")
    p.add_argument("--deep-args", default="",
                   help="extra flags for the deep run only, e.g. \"--reweight-recipe paper\" (uncapped, undecayed, as "
                   "published); other unknown flags go to every method")
    args, extra = p.parse_known_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    out, results = Path(args.out), Path(args.results)
    command = " ".join(["python -m fairseq_reweight.image.compare"] + (argv if argv is not None else sys.argv[1:]))
    for m in methods:
        run_method(m, out, args, extra + (shlex.split(args.deep_args) if m == "deep" else []))
        write_report(collect(out, methods), methods, out, results, command)


if __name__ == "__main__":
    main()
