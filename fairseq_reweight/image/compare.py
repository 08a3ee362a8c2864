"""The evidence run: none / mwnet / l2rw / deep under the same seeds, noise and budget, then RESULTS.md.

    python -m fairseq_reweight.image.compare                 # cpu preset, examples/image/RESULTS.md
    python -m fairseq_reweight.image.compare --device cuda   # same runs on a GPU
    python -m fairseq_reweight.image.compare --deep-args "--reweight-recipe paper"   # deep as published

Every method trains with ``python -m fairseq_reweight.image --preset cpu`` (Fashion-MNIST, ResNet-32) for every
noise of ``--noise`` (default 40 % uniform and 40 % flip) and every seed of ``--seeds`` (default 1, 2), in
``OUT/NOISE/METHOD/seedS``; a finished run is skipped and an interrupted one resumed, so the command can simply
be run again. After every run the report is rewritten: per noise, the last-epoch test accuracy of every seed and
its mean, the best epoch, the AUC of the weights for clean vs noisy labels (last epoch; 0.5 for uniform weights),
seconds per iteration and the ratio to ``none``, the targets, and two plots (accuracy/AUC curves averaged over the
seeds; weight histograms of clean vs noisy examples in seed 1's last epoch). ``results.json`` beside the report
lists every run as ``{"method", "noise", "seed", "acc", "auc", ...}`` with its curves and weight histogram; its rows
for runs that are not on disk (a fresh machine) are kept, shown as carried over and drawn in the plots.
Targets (Fan et al. 2021 vs MW-Net, Shu et al. 2019, and L2RW, Ren et al. 2018), means over the seeds: last-epoch
accuracy of ``deep`` >= ``none`` + 3 points and >= ``mwnet``; weight AUC of ``deep`` >= 0.93.
"""

import argparse
import datetime
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from ..core import METHODS
from .noise import NOISE_TYPES, check_rate

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_METHODS = ("none", "mwnet", "l2rw", "deep")
DEFAULT_NOISE = "uniform0.4,flip0.4"
AUC_TARGET = 0.93


class Noise(NamedTuple):
    kind: str
    rate: float

    @property
    def name(self) -> str:  # uniform0.4
        return f"{self.kind}{self.rate:g}"


def parse_noise(spec: str) -> List[Noise]:
    """``uniform0.4,flip0.4`` -> [Noise('uniform', 0.4), Noise('flip', 0.4)]."""
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        m = re.fullmatch(r"([a-z]+)(\d*\.?\d+)", part)
        if not m or m.group(1) not in NOISE_TYPES:
            raise ValueError(f"--noise {part!r}: use TYPE RATE without a space, TYPE one of {', '.join(NOISE_TYPES)}, "
                             f"e.g. --noise {DEFAULT_NOISE}")
        check_rate(float(m.group(2)))
        out.append(Noise(m.group(1), float(m.group(2))))
    if not out:
        raise ValueError(f"--noise is empty: e.g. --noise {DEFAULT_NOISE}")
    return out


def parse_seeds(spec: str) -> List[int]:
    try:
        seeds = [int(s) for s in spec.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--seeds {spec!r}: use comma-separated integers, e.g. --seeds 1,2") from None
    if not seeds:
        raise ValueError("--seeds is empty: e.g. --seeds 1,2")
    return seeds


def run_dir(out: Path, noise, method: str, seed: int) -> Path:
    """``OUT/NOISE/METHOD/seedS`` (``noise``: a :class:`Noise` or its name)."""
    return out / (noise if isinstance(noise, str) else noise.name) / method / f"seed{seed}"


def run_method(method: str, noise: Noise, seed: int, out: Path, args, extra: List[str], quiet: bool) -> None:
    rd = run_dir(out, noise, method, seed)
    log = rd / "log.json"
    tag = f"{noise.name}/{method}/seed{seed}"
    if log.is_file() and json.loads(log.read_text())["summary"]["finished"]:
        print(f"[compare] {tag}: finished run in {rd}, skipped", flush=True)
        return
    cmd = [sys.executable, "-m", "fairseq_reweight.image", "--preset", args.preset, "--noise", noise.kind,
           "--noise-rate", f"{noise.rate:g}", "--reweight-method", method, "--save-dir", str(rd),
           "--dump-weights", str(rd / "weights.tsv"), "--seed", str(seed), "--device", args.device,
           "--threads", str(args.threads)]
    if (rd / "checkpoint_last.pt").is_file():
        cmd.append("--resume")
    cmd += extra
    print(f"[compare] {tag}: {' '.join(cmd[1:])}", flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if not quiet:
        subprocess.run(cmd, check=True, env=env)
        return
    rd.mkdir(parents=True, exist_ok=True)
    with open(rd / "train.out", "a") as f:  # runs side by side: each its own log, one line here when it ends
        proc = subprocess.run(cmd + ["--no-progress"], stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{tag} failed (exit {proc.returncode}); its output: {rd / 'train.out'}")
    print(f"[compare] {tag}: done", flush=True)


def last_epoch_weights(rd: Path, log: dict):
    """(weights, noisy flags) of the examples seen in the last epoch, from the weight dump."""
    dump = rd / "weights.tsv"
    if not dump.is_file() or not log["epochs"]:
        return None
    epochs = log["epochs"]
    first = epochs[-2]["updates"] if len(epochs) > 1 else 0
    rows = np.loadtxt(dump, delimiter="\t", skiprows=1, ndmin=2)
    rows = rows[rows[:, 0] >= first]
    labels = np.loadtxt(rd / "labels.tsv", delimiter="\t", skiprows=1, usecols=(0, 3), dtype=np.int64, ndmin=2)
    noisy = dict(zip(labels[:, 0].tolist(), labels[:, 1].tolist()))
    flags = np.array([noisy[int(i)] for i in rows[:, 1]], dtype=bool)
    return rows[:, 2], flags


Key = Tuple[str, str, int]  # (noise, method, seed)


def collect(out: Path, noises: List[Noise], methods, seeds) -> Dict[Key, dict]:
    logs = {}
    for n in noises:
        for m in methods:
            for s in seeds:
                path = run_dir(out, n, m, s) / "log.json"
                if path.is_file():
                    logs[(n.name, m, s)] = json.loads(path.read_text())
    return logs


def curves(log: dict) -> dict:
    """The per-epoch test accuracy and weight AUC of a run (what the accuracy plot draws)."""
    return {"acc_by_epoch": [e["test_acc"] for e in log["epochs"]],
            "auc_by_epoch": [e["weight_auc"] for e in log["epochs"]]}


HIST_BINS = 40


def weight_hist(rd: Path, log: dict) -> Optional[dict]:
    """Counts of the last epoch's weights of clean and noisy examples on ``HIST_BINS`` equal bins from 0 to ``top``
    (what the weight plot draws), or None without a weight dump."""
    wf = last_epoch_weights(rd, log)
    if wf is None:
        return None
    w, noisy = wf
    top = max(float(w.max()), 1.0) * 1.02 + 1e-6
    edges = np.linspace(0, top, HIST_BINS + 1)
    return {"top": top, "clean": np.histogram(w[~noisy], edges)[0].tolist(),
            "noisy": np.histogram(w[noisy], edges)[0].tolist()}


def result_rows(logs: Dict[Key, dict], old: List[dict], out: Path) -> List[dict]:
    """One row per finished run on disk, plus the rows of an earlier ``results.json`` not on disk (``carried``).
    A row keeps the run's curves and last-epoch weight histogram, so the plots can be redrawn without the run."""
    rows = []
    for (noise, method, seed), log in logs.items():
        s = log["summary"]
        if not s["finished"]:
            continue
        rows.append({"method": method, "noise": noise, "seed": seed, "acc": s["last_test_acc"],
                     "auc": None if method == "none" else s["last_weight_auc"], "best_acc": s["best_test_acc"],
                     "best_epoch": s["best_epoch"], "sec_per_iter": s["sec_per_iter"],
                     "meta_grad": log["config"].get("meta_grad") if method != "none" else None, **curves(log),
                     "weight_hist": weight_hist(run_dir(out, noise, method, seed), log)})
    have = {(r["noise"], r["method"], r["seed"]) for r in rows}
    rows += [dict(r, carried=True) for r in old if (r["noise"], r["method"], r["seed"]) not in have]
    return sorted(rows, key=lambda r: (r["noise"], r["method"], r["seed"]))


def plot(rows: List[dict], logs: Dict[Key, dict], noise: Noise, methods, img_dir: Path) -> List[str]:
    """The accuracy/AUC curves (mean over seeds) and the weight histograms of each method's first seed, from the
    rows (finished runs, on disk or carried over) and the unfinished runs' logs."""
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in rows if r["noise"] == noise.name and r.get("acc_by_epoch")]
    done = {(r["method"], r["seed"]) for r in runs}
    runs += [dict(method=k[1], seed=k[2], **curves(v)) for k, v in sorted(logs.items())
             if k[0] == noise.name and v["epochs"] and not v["summary"]["finished"] and (k[1], k[2]) not in done]
    if not runs:
        return []
    names = [f"accuracy_{noise.name}.png", f"weights_{noise.name}.png"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        if not mine:
            continue
        n = min(len(r["acc_by_epoch"]) for r in mine)  # the epochs every seed has reached
        ep = np.arange(1, n + 1)
        acc = np.mean([r["acc_by_epoch"][:n] for r in mine], 0)
        auc = np.mean([[np.nan if a is None else a for a in r["auc_by_epoch"][:n]] for r in mine], 0)
        label = f"{m} ({len(mine)} seed{'s' if len(mine) > 1 else ''})"
        ax1.plot(ep, acc, marker="o", ms=3, label=label)
        ax2.plot(ep, auc, marker="o", ms=3, label=label)
    ax1.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"test accuracy, {noise.name} (mean over seeds)")
    ax2.set(xlabel="epoch", ylabel="AUC", title="weight AUC, clean vs noisy labels", ylim=(0, 1.02))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(img_dir / names[0], dpi=100)
    plt.close(fig)

    first = {}
    for m in methods:
        for r in sorted((r for r in runs if r["method"] == m and r.get("weight_hist")), key=lambda r: r["seed"]):
            first.setdefault(m, r)
    fig, axes = plt.subplots(1, max(len(first), 1), figsize=(3.6 * max(len(first), 1), 3.2), squeeze=False)
    for ax, (m, r) in zip(axes[0], first.items()):
        h = r["weight_hist"]
        edges = np.linspace(0, h["top"], len(h["clean"]) + 1)
        for key in ("clean", "noisy"):
            ax.hist(edges[:-1], bins=edges, weights=h[key], alpha=0.6, density=True, label=key)
        ax.set(title=f"{m}, seed {r['seed']}", xlabel="weight (last epoch)")
        ax.legend()
    axes[0][0].set_ylabel("density")
    fig.tight_layout()
    fig.savefig(img_dir / names[1], dpi=100)
    plt.close(fig)
    return names


def _f(v, fmt="{:.2f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def noise_section(noise: Noise, rows: List[dict], logs: Dict[Key, dict], methods, seeds, img_dir: Path) -> List[str]:
    mine = [r for r in rows if r["noise"] == noise.name]
    wrong = [v["summary"]["wrong_label_fraction"] for k, v in logs.items() if k[0] == noise.name]
    lines = [f"## {noise.kind} noise, p = {noise.rate:g}"
             + (f" ({100 * wrong[0]:.1f}% of the training labels wrong)" if wrong else ""), ""]
    lines += ["| method | last-epoch test acc, per seed | mean | best acc, mean (epochs) | weight AUC, per seed | "
              "mean AUC | meta-gradient | s/iter | x none |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    by = {m: [r for r in mine if r["method"] == m] for m in methods}
    none_spi = _mean(r["sec_per_iter"] for r in by.get("none", []))
    means = {}
    for m in methods:
        rs = by[m]
        running = [k[2] for k, v in logs.items() if k[:2] == (noise.name, m) and not v["summary"]["finished"]]
        if not rs:
            lines.append(f"| {m} | " + (f"unfinished (seeds {', '.join(map(str, running))})" if running
                                        else "not run yet") + " | | | | | | | |")
            continue
        acc, auc, spi = _mean(r["acc"] for r in rs), _mean(r["auc"] for r in rs), _mean(r["sec_per_iter"] for r in rs)
        means[m] = (acc, auc)
        mark = lambda r: "†" if r.get("carried") else ""  # noqa: E731
        per_seed = ", ".join(f"{_f(r['acc'])}{mark(r)}" for r in rs)
        per_auc = ", ".join(_f(r["auc"], "{:.3f}") for r in rs) if m != "none" else ""
        best = f"{_f(_mean(r['best_acc'] for r in rs))} ({', '.join(str(r['best_epoch']) for r in rs)})"
        ratio = spi / none_spi if spi and none_spi else None
        note = f" (seeds {', '.join(str(r['seed']) for r in rs)}" + (f"; unfinished {running}" if running else "") + ")"
        grads = ", ".join(dict.fromkeys(str(r.get("meta_grad")) for r in rs if r.get("meta_grad")))
        lines.append(f"| {m}{note} | {per_seed} | **{_f(acc)}** | {best} | {per_auc} | "
                     f"{_f(auc, '{:.3f}') if m != 'none' else ''} | {grads} | {_f(spi, '{:.3f}')} | {_f(ratio)} |")
    lines += ["", "Targets (means over the seeds; a comparison of two methods over the seeds both have):"]
    checks = []
    for other, margin in (("none", 3.0), ("mwnet", 0.0)):
        if "deep" in means and other in means:
            seeds_both = sorted({r["seed"] for r in by["deep"]} & {r["seed"] for r in by[other]})
            d, o = (_mean(r["acc"] for r in by[m] if r["seed"] in seeds_both) for m in ("deep", other))
            target = f"{other} + {margin:g}" if margin else other
            where = f"seeds {', '.join(map(str, seeds_both))}" if seeds_both else "no seed run by both"
            checks.append((f"last-epoch accuracy of deep >= {target} ({_f(d)} vs {_f(None if o is None else o + margin)}; "
                           f"{where})", d is not None and o is not None and d >= o + margin))
    if "deep" in means:
        a = means["deep"][1]
        checks.append((f"weight AUC of deep >= {AUC_TARGET} ({_f(a, '{:.3f}')})", a is not None and a >= AUC_TARGET))
    lines += [f"- [{'x' if ok else ' '}] {text}" for text, ok in checks] or ["- (no finished runs yet)"]
    lines += [""] + [f"![{name}]({name})" for name in plot(rows, logs, noise, methods, img_dir)] + [""]
    return lines


def write_report(logs: Dict[Key, dict], noises: List[Noise], methods, seeds, out: Path, results: Path,
                 command: str) -> None:
    results.parent.mkdir(parents=True, exist_ok=True)
    json_path = results.with_name("results.json")
    old = json.loads(json_path.read_text()) if json_path.is_file() else []
    rows = result_rows(logs, old, out)
    lines = ["# Image experiments: none / MW-Net / L2RW / deep on noisy labels", "",
             f"Generated by `{command}` on {datetime.date.today().isoformat()}; runs in `{out}`; every row also in "
             f"[`{json_path.name}`]({json_path.name}).", ""]
    if logs:
        cfg, s = next(iter(logs.values()))["config"], next(iter(logs.values()))["summary"]
        steps = ", ".join(map(str, cfg["lr_steps"]))
        lines += [
            f"Setup: {cfg['dataset']}, {s['train_images']} training images, {s['meta_images']} clean meta images, "
            f"{s['test_images']} test images; {cfg['arch']}, {cfg['epochs']} epochs of batch {cfg['batch_size']}, "
            f"SGD lr {cfg['lr']} (x{cfg['lr_decay']} at epochs {steps}), momentum {cfg['momentum']}, weight decay "
            f"{cfg['weight_decay']}, crop padding {cfg['crop_pad']}; seeds {', '.join(map(str, seeds))}, data seed "
            f"{cfg['data_seed']}; device {s['device']}, {s['threads']} threads, torch {s['torch']}.", ""]
    for noise in noises:
        lines += noise_section(noise, rows, logs, methods, seeds, results.parent)
    lines += ["Weight AUC: probability that a random clean-label example gets a larger weight than a random "
              "noisy-label one in the last epoch (ties count 1/2, so uniform weights score 0.5). s/iter: runs side "
              "by side (`--jobs`) share the cores, so compare ratios within one report."]
    if any(r.get("carried") for r in rows):
        lines += ["", f"† carried over from `{json_path.name}` (the run is not on this machine)."]
    results.write_text("\n".join(lines) + "\n")
    tmp = json_path.with_name(f".{json_path.name}.tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(tmp, json_path)
    print(f"[compare] wrote {results} and {json_path.name}", flush=True)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fairseq_reweight.image.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/image/compare", help="run directories, OUT/NOISE/METHOD/seedS")
    p.add_argument("--results", default=str(ROOT / "examples/image/RESULTS.md"),
                   help="report to write; results.json and the PNG plots go next to it")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated, run in this order")
    p.add_argument("--noise", default=DEFAULT_NOISE, help="comma-separated TYPE+RATE, e.g. uniform0.4,flip0.4")
    p.add_argument("--seeds", default="1,2", help="comma-separated training seeds")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per run (0: torch's default)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (2 single-thread runs use a 2-core machine)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from the runs on disk")
    p.add_argument("--deep-args", default="",
                   help="extra flags for the deep run only, e.g. \"--reweight-recipe paper\" (uncapped, undecayed, as "
                   "published); other unknown flags go to every method")
    args, extra = p.parse_known_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    clash = [a for a in extra + shlex.split(args.deep_args) if a.split("=")[0] in ("--noise-rate", "--seed")]
    if clash:
        p.error(f"{clash[0]} is set per run: use --noise TYPE+RATE (e.g. {DEFAULT_NOISE}) and --seeds")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    try:
        noises, seeds = parse_noise(args.noise), parse_seeds(args.seeds)
    except ValueError as e:
        p.error(str(e))
    out, results = Path(args.out), Path(args.results)
    command = " ".join(["python -m fairseq_reweight.image.compare"] + (argv if argv is not None else sys.argv[1:]))
    lock = threading.Lock()

    def report():
        with lock:
            write_report(collect(out, noises, methods, seeds), noises, methods, seeds, out, results, command)

    if args.report_only:
        report()
        return
    todo = [(n, s, m) for n in noises for m in methods for s in seeds]

    def one(job):
        n, s, m = job
        run_method(m, n, s, out, args, extra + (shlex.split(args.deep_args) if m == "deep" else []),
                   quiet=args.jobs > 1)
        report()

    if args.jobs == 1:
        for job in todo:
            one(job)
        return
    with ThreadPoolExecutor(args.jobs) as pool:
        for f in [pool.submit(one, job) for job in todo]:
            f.result()


if __name__ == "__main__":
    main()
