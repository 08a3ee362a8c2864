#!/usr/bin/env python
"""Write examples/multi30k/RESULTS.md from the runs of scripts/run_multi30k_benchmark.sh.

Reads, for each ``RUNS/{clean,noisy}/METHOD/seedS``: ``bleu_test.json`` (eval_bleu.sh),
``weights_analysis.json`` (analyze_weights.py, noisy runs) and ``train.log`` (seconds per update from
the timestamps of fairseq's ``train_inner`` lines within an epoch, so validation and checkpointing
are not counted). Missing runs are reported as missing, so a partial table can be written at any time.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import sys
from pathlib import Path

CONDITION_LABEL = {"clean": "clean", "noisy": "noisy"}
_INNER = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \| INFO \| train_inner \| epoch (\d+):.*?num_updates=(\d+)")


def seconds_per_update(log_path: Path):
    """(seconds per update, updates timed, last update) from train_inner timestamps, epoch boundaries excluded."""
    if not log_path.exists():
        return None, 0, None
    prev = None
    dt = du = 0.0
    last = None
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = _INNER.match(line)
        if not m:
            if "| INFO | fairseq_cli.train | loaded checkpoint" in line or "Start iterating" in line:
                prev = None  # a (re)start: do not time across it
            continue
        t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
        epoch, upd = int(m.group(2)), int(m.group(3))
        if prev is not None and prev[0] == epoch and upd > prev[1]:
            dt += t - prev[2]
            du += upd - prev[1]
        prev = (epoch, upd, t)
        last = upd
    return (dt / du if du else None), int(du), last


_TRAIN_END = re.compile(r"\| INFO \| train \| epoch \d+ \|.*?\| num_updates (\d+)")


def final_updates(log_path: Path):
    """num_updates of the last end-of-epoch summary in train.log (None if there is none)."""
    if not log_path.exists():
        return None
    found = _TRAIN_END.findall(log_path.read_text(encoding="utf-8", errors="replace"))
    return int(found[-1]) if found else None


def filter_seconds(runs: Path, cond: str, method: str, seed: str):
    """What a filter-* run costs before its retraining: the scoring of the train split, plus for dual-xent the
    backward model's training (the forward scorer is a checkpoint the table has anyway: the shared warm-up or the
    none run). None when not on disk."""
    d = runs / cond / method / f"seed{seed}"
    timing = load_json(d / "score_time.json") or {}
    if not method.startswith("filter-") or timing.get("score_seconds") is None:
        return None
    if not method.startswith("filter-dual-xent"):  # also a named variant's folder, e.g. filter-dual-xent-full
        return timing["score_seconds"]
    backward = [Path(timing["backward_dir"])] if timing.get("backward_dir") else \
        sorted((runs / cond).glob(f"backward*/seed{seed}"))  # runs scored before the runner recorded it
    wall = (load_json(backward[0] / "train_time.json") or {}).get("wall_seconds") if len(backward) == 1 else None
    return None if wall is None else timing["score_seconds"] + wall


def load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def mean_sd(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def fmt_stat(xs, nd=2):
    m, sd = mean_sd(xs)
    if m is None:
        return "–"
    s = f"{m:.{nd}f}"
    if sd is not None:
        s += f" ± {sd:.{nd}f}"
    vals = [x for x in xs if x is not None]
    if len(vals) > 1:
        s += " (" + ", ".join(f"{x:.{nd}f}" for x in vals) + ")"
    missing = sum(x is None for x in xs)
    if missing:
        s += f" [{missing} missing]"
    return s


def combined_auc_plot(curves, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, curve in curves.items():
        xs = [(p["update_from"] + p["update_to"]) / 2 for p in curve]
        ys = [p["auc"] if p["auc"] is not None else float("nan") for p in curve]
        ax.plot(xs, ys, marker="o", markersize=3, label=method)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(0.3, 1.0)
    ax.set_xlabel("update")
    ax.set_ylabel("AUC of weights (clean vs corrupted)")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# results.json fields beyond method/condition/seed/bleu/chrf/auc, and the weight analysis' keys they hold, so that a
# table regenerated on another machine (--carry) shows every column of runs no longer on disk
CARRIED = (("auc_sentence_mean", "auc_last_sentence_mean"), ("w_clean", "mean_w_clean_last"),
           ("w_corrupted", "mean_w_corrupted_last"), ("auc_neg_loss", "auc_last_neg_loss"),
           ("auc_with_left_out", "auc_last_with_left_out"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-dir", required=True)
    p.add_argument("--results-dir", required=True)
    p.add_argument("--seeds", default="1 2")
    p.add_argument("--methods", default="none l2rw mwnet deep perfect")
    p.add_argument("--conditions", default="clean noisy")
    p.add_argument("--noise", default="misaligned")
    p.add_argument("--noise-rate", default="0.3")
    p.add_argument("--preset", default="small-cpu")
    p.add_argument("--max-update", default="?")
    p.add_argument("--warmup", default="0", help="updates of the shared plain warm-up")
    p.add_argument("--jobs", default="1")
    p.add_argument("--threads", default="1")
    p.add_argument("--data-clean", default="")
    p.add_argument("--data-noisy", default="")
    p.add_argument("--command", default="scripts/run_multi30k_benchmark.sh")
    p.add_argument("--carry", default="", help="an earlier results.json: its rows stand in for runs that are not in "
                   "--runs-dir (BLEU, chrF, the weight analysis' figures and s/update; listed as carried over)")
    args = p.parse_args(argv)

    runs, out = Path(args.runs_dir), Path(args.results_dir)
    if not runs.is_dir():
        print(f"error: runs folder {runs} not found", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    seeds, methods, conds = args.seeds.split(), args.methods.split(), args.conditions.split()
    noisy_label = f"{args.noise} {float(args.noise_rate):.0%}"
    label = {"clean": "clean", "noisy": noisy_label}

    R = {}
    for c in conds:
        for m in methods:
            if (m == "perfect" or m.startswith("filter-")) and c != "noisy":
                continue  # the noisy condition's reference and filters only
            for s in seeds:
                d = runs / c / m / f"seed{s}"
                bleu = load_json(d / "bleu_test.json")
                ana = load_json(d / "weights_analysis.json")
                spu, timed, last = seconds_per_update(d / "train.log")
                R[c, m, s] = {"dir": d, "bleu": bleu, "ana": ana, "spu": spu, "updates": final_updates(d / "train.log"),
                              "wall": (load_json(d / "train_time.json") or {}).get("wall_seconds"),
                              "filter": load_json(d / "filter_analysis.json"),
                              "filter_s": filter_seconds(runs, c, m, s)}
    cond_name = {"clean": "clean", "noisy": f"{args.noise}{float(args.noise_rate):g}"}
    carried = []
    if args.carry:
        for row in load_json(Path(args.carry)) or []:
            c = next((k for k, v in cond_name.items() if v == row.get("condition")), None)
            key = (c, row.get("method"), str(row.get("seed")))
            if key in R and R[key]["bleu"] is None:
                R[key].update(bleu={"bleu": row["bleu"], "chrf": row.get("chrf"),
                                    **{k: row[k] for k in ("bleu_signature", "chrf_signature") if k in row}},
                              updates=None,
                              spu=row.get("s_per_update"), wall=row.get("train_wall_s"),
                              filter_s=row.get("filter_seconds"))
                if row.get("auc") is not None:  # a filter's AUC is its score's; a method's, its weights'
                    if key[1].startswith("filter-"):
                        R[key]["filter"] = {"auc": row["auc"]}
                    else:
                        R[key]["ana"] = {"auc_last": row["auc"], **{k: row[f] for f, k in CARRIED if f in row}}
                carried.append(f"{key[0]}/{key[1]}/seed{key[2]}")
    done = sum(r["bleu"] is not None for r in R.values())

    def get(c, m, s):
        return R.get((c, m, s), {"bleu": None, "ana": None, "spu": None, "wall": None})

    L = []
    L.append("# Multi30k De→En: learning to reweight, four methods, clean and noisy training data\n")
    L.append(f"Generated by `{args.command}` on {datetime.date.today().isoformat()} "
             f"({platform.machine()}, {os.cpu_count()} CPU cores; {done}/{len(R)} runs finished).\n")
    L.append(f"- Data: Multi30k task 1, train minus a clean **meta** split held out before the noise; "
             f"noisy condition: `{args.noise}` noise on {float(args.noise_rate):.0%} of the train pairs "
             f"(`scripts/prepare_multi30k.sh`). Test: test_2016_flickr (1000 sentences).")
    L.append(f"- Training: `scripts/train_translation.sh METHOD DATA SAVE --preset {args.preset} --seed S "
             f"--max-update {args.max_update} --threads {args.threads}`; the same preset, seeds and number of updates "
             f"for every method, each method with its defaults; {args.jobs} run(s) at a time."
             + (f" Shared warm-up: the first {args.warmup} updates are plain training, trained once per seed and "
                "condition; every method continues from that checkpoint (`--continue-once`)."
                if str(args.warmup) not in ("", "0") else "")
             + (" `perfect`: plain training on the clean pairs of the noisy data only (perfect weights), from "
                "scratch, same number of updates." if "perfect" in methods else ""))

    L.append("- BLEU/chrF: `scripts/eval_bleu.sh` (beam 5, checkpoint_last.pt, sentencepiece-decoded, sacrebleu on "
             "detokenised text against the raw references). Cells: mean ± sample s.d. over seeds (per-seed values).")
    L.append("- Weight AUC: `scripts/analyze_weights.py`; AUC of the weight as a score for *clean* vs *corrupted* "
             "(0.5 = no separation, 1 = every clean pair above every corrupted one), over the last 20% of updates. "
             "Runs with `--drop-below` (deep's default) train in the end on the filter's survivors only: the rows "
             "rank those; *left-out sentences at weight 0* ranks every sentence by what the student gives it (its mean "
             "weight over the last 20%, 0 once left out).\n")

    sig = next((r["bleu"]["bleu_signature"] for r in R.values() if (r["bleu"] or {}).get("bleu_signature")), None)
    csig = next((r["bleu"]["chrf_signature"] for r in R.values() if (r["bleu"] or {}).get("chrf_signature")), None)

    L.append("## BLEU on test_2016_flickr\n")
    L.append("| method | " + " | ".join(label[c] for c in conds) + " |")
    L.append("|---|" + "---|" * len(conds))
    for m in methods:
        cells = [fmt_stat([get(c, m, s)["bleu"]["bleu"] if get(c, m, s)["bleu"] else None for s in seeds]) for c in conds]
        L.append(f"| {m} | " + " | ".join(cells) + " |")
    L.append(f"\nsacrebleu signature: `{sig}`\n" if sig else "\n(no finished runs yet)\n")

    L.append("## chrF on test_2016_flickr\n")
    L.append("| method | " + " | ".join(label[c] for c in conds) + " |")
    L.append("|---|" + "---|" * len(conds))
    for m in methods:
        cells = [fmt_stat([get(c, m, s)["bleu"]["chrf"] if get(c, m, s)["bleu"] else None for s in seeds]) for c in conds]
        L.append(f"| {m} | " + " | ".join(cells) + " |")
    if csig:
        L.append(f"\nchrF signature: `{csig}`\n")

    if "noisy" in conds:
        L.append(f"## Weight AUC on the noisy run ({noisy_label})\n")
        L.append("| method | AUC, last 20% of updates | AUC of per-sentence mean weight, last 20% | "
                 "AUC, left-out sentences at weight 0 | mean weight clean / corrupted, last 20% | "
                 "AUC of −loss (reference) |")
        L.append("|---|---|---|---|---|---|")
        for m in (m for m in methods if m != "perfect"):
            if m.startswith("filter-"):  # the filter's score, not a weight: its AUC over the whole train split
                L.append(f"| {m} (its score, whole train split) | "
                         f"{fmt_stat([(R['noisy', m, s]['filter'] or {}).get('auc') for s in seeds], 3)} | – | – | – | – |")
                continue
            anas = [R["noisy", m, s]["ana"] for s in seeds]

            def col(key, nd=3):
                return fmt_stat([a.get(key) if a else None for a in anas], nd)

            wc, wx = mean_sd([a.get("mean_w_clean_last") if a else None for a in anas])[0], \
                mean_sd([a.get("mean_w_corrupted_last") if a else None for a in anas])[0]
            ws = f"{wc:.3f} / {wx:.3f}" if wc is not None and wx is not None else "–"
            L.append(f"| {m} | {col('auc_last')} | {col('auc_last_sentence_mean')} | "
                     f"{col('auc_last_with_left_out')} | {ws} | {col('auc_last_neg_loss')} |")
        L.append("")

    L.append("## Seconds per update\n")
    L.append("Wall-clock seconds per update from the timestamps of fairseq's log lines (validation and "
             f"checkpointing excluded), mean over seeds; the ratio is to `none` in the same condition. "
             f"{args.threads} CPU thread(s) per run, {args.jobs} run(s) at a time"
             + (" (the seeds of one method side by side)." if int(args.jobs) > 1 else ".") + " *Filter cost*: what a "
             "filter-* run spends before retraining, the scoring of the train split and, for dual-xent, the backward "
             "model's training (its forward scorer, the shared warm-up or the none run, is not counted again).\n")
    L.append("| method | " + " | ".join(f"{label[c]}: s/update | ratio" for c in conds)
             + " | train wall (min, mean) | filter cost (min, mean) |")
    L.append("|---|" + "---|---|" * len(conds) + "---|---|")
    base = {c: mean_sd([R[c, "none", s]["spu"] for s in seeds])[0] if "none" in methods else None for c in conds}
    for m in methods:
        cells = []
        for c in conds:
            spu = mean_sd([get(c, m, s)["spu"] for s in seeds])[0]
            ratio = spu / base[c] if spu is not None and base[c] else None
            cells += [f"{spu:.3f}" if spu is not None else "–", f"{ratio:.2f}×" if ratio is not None else "–"]
        walls = [get(c, m, s)["wall"] for c in conds for s in seeds if get(c, m, s)["wall"]]
        wall = f"{statistics.mean(walls) / 60:.1f}" if walls else "–"
        fcost = [get(c, m, s).get("filter_s") for c in conds for s in seeds if get(c, m, s).get("filter_s")]
        fcost = f"{statistics.mean(fcost) / 60:.1f}" if fcost else "–"
        L.append(f"| {m} | " + " | ".join(cells) + f" | {wall} | {fcost} |")
    L.append("")

    # plots: combined AUC curves (first seed with data) + each method's histogram / curve
    plots = []
    if "noisy" in conds:
        # a carried run's plots stay as an earlier report wrote them; the combined plot is redrawn only when every
        # method with weights has its curve on disk
        s = seeds[0]
        curves = {m: R["noisy", m, s]["ana"]["curve"] for m in methods
                  if m != "perfect" and (R["noisy", m, s]["ana"] or {}).get("curve")}
        weighted = [m for m in methods if (R["noisy", m, s]["ana"] or {}).get("auc_last") is not None]
        path = out / "weights_auc_all.png"
        if curves and set(weighted) <= set(curves):
            combined_auc_plot(curves, path, f"weight AUC over training, {noisy_label}, seed {s}")
        if path.exists():
            plots.append((f"Weight AUC over training, all methods (seed {s})", path.name))
        for m in (m for m in methods if m != "perfect" and not m.startswith("filter-")):
            d = R["noisy", m, s]["dir"]
            for name, what in (("weights_hist.png", "weight histogram, clean vs corrupted"),
                               ("weights_auc.png", "weight AUC over training")):
                dest = out / name.replace(".png", f"_{m}.png")
                if (d / name).exists():
                    shutil.copy(d / name, dest)
                if dest.exists():
                    plots.append((f"{m}: {what} (seed {s})", dest.name))
    if plots:
        L.append("## Plots\n")
        for caption, name in plots:
            L.append(f"**{caption}**\n\n![{caption}]({name})\n")

    L.append("## Per-run files\n")
    L.append(f"Runs folder: `{runs}` (`CONDITION/METHOD/seedS/`: train.log, weights.tsv, bleu_test.json, "
             "hyp_test.txt, weights_analysis.json).")
    if str(args.max_update).isdigit():
        off = [f"{c}/{m}/seed{s} ({r['updates']})" for (c, m, s), r in R.items()
               if r["bleu"] is not None and r["updates"] is not None and r["updates"] != int(args.max_update)]
        if off:
            L.append(f"\n**Warning:** these runs did not stop at --max-update {args.max_update} (a runs folder "
                     f"reused with another budget?): {', '.join(off)}")
    if carried:
        L.append(f"\nCarried over from `{args.carry}` (runs no longer on disk; per-seed figures as recorded there): "
                 f"{', '.join(carried)}")
    missing = [f"{c}/{m}/seed{s}" for (c, m, s), r in R.items() if r["bleu"] is None]
    if missing:
        L.append(f"\nMissing (not finished yet): {', '.join(missing)}")
    rows = []
    for (c, m, s), r in sorted(R.items()):
        if r["bleu"] is None:
            continue
        a = r["ana"].get("auc_last") if (r["ana"] and c == "noisy" and m not in ("none", "perfect")) else None
        if m.startswith("filter-"):
            a = (r["filter"] or {}).get("auc")
            a = round(a, 4) if a is not None else None
        row = {"method": m, "condition": cond_name[c], "seed": int(s), "bleu": r["bleu"]["bleu"],
               "chrf": r["bleu"]["chrf"], "auc": a}
        if a is not None and not m.startswith("filter-"):
            row.update({f: r["ana"][k] for f, k in CARRIED if r["ana"].get(k) is not None})
        row.update({k: v for k, v in (("s_per_update", r.get("spu")), ("train_wall_s", r.get("wall")),
                                      ("filter_seconds", r.get("filter_s")),
                                      ("bleu_signature", r["bleu"].get("bleu_signature")),
                                      ("chrf_signature", r["bleu"].get("chrf_signature"))) if v is not None})
        rows.append(row)
    if args.carry:  # rows of methods, conditions or seeds outside this table are kept, not lost
        shown = {(r["method"], r["condition"], r["seed"]) for r in rows}
        rows += [r for r in load_json(Path(args.carry)) or [] if (r.get("method"), r.get("condition"),
                                                                  r.get("seed")) not in shown]
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    if "noisy" in conds and {"none", "perfect"} <= set(methods):
        mean = {m: mean_sd([get("noisy", m, s)["bleu"]["bleu"] if get("noisy", m, s)["bleu"] else None
                            for s in seeds])[0] for m in methods}
        if mean["none"] is not None and mean["perfect"] is not None and mean["perfect"] > mean["none"]:
            gap = mean["perfect"] - mean["none"]
            parts = [f"`{m}` {100 * (mean[m] - mean['none']) / gap:+.0f} %" for m in methods
                     if m not in ("none", "perfect") and mean[m] is not None]
            L.insert(L.index("## chrF on test_2016_flickr\n"),
                     f"Share of the gap to perfect weights ({gap:.2f} BLEU, {noisy_label}) recovered, mean over "
                     f"seeds: {', '.join(parts) or '–'}.\n")
    text = "\n".join(L) + "\n"
    (out / "RESULTS.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"[report] wrote {out / 'RESULTS.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
