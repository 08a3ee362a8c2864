#!/usr/bin/env python
"""Side-by-side cost of reweighting vs plain training: seconds per update and peak memory.

Every configuration lives in its own worker process (so each has its own peak memory) and the
workers take turns: each round, every worker runs ``--updates-per-round`` updates, in an order
that rotates between rounds, so drift of the machine's speed hits all configurations alike. The
first round is warm-up and is not counted. Prints the seconds per update (each round's mean, so
updates with and without a meta step are averaged over whole --meta-interval/--meta-refresh cycles;
the median of those means over rounds, against outliers), its ratio to the plain baseline, the peak
memory above the worker's state before its first update (CPU: peak RSS; CUDA:
``torch.cuda.max_memory_allocated``) and its ratio; writes the table to ``--out`` as Markdown and JSON.

    # NMT: Multi30k, the tiny-cpu preset of scripts/train_translation.sh
    python scripts/bench_speed.py nmt --data data-bin/multi30k_de_en_v8000_m1000_s1
    # images: ResNet-32, batch 100, Fashion-MNIST (or --dataset cifar10 --data-dir DIR)
    python scripts/bench_speed.py image

Arguments after ``--`` go to every configuration. Configurations are ``NAME=ARGS`` (``--config``
repeats; ARGS are appended to the reweighting command line); the built-in sets cover every method with ``--meta-grad fast``, deep
with ``fd`` and ``exact``, ``--meta-interval 4`` and ``--meta-refresh``.
"""

import argparse
import json
import multiprocessing as mp
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]

NMT_CONFIGS = [
    ("plain", None),
    ("none", "--reweight-method none"),
    ("l2rw fast", "--reweight-method l2rw"),
    ("mwnet fast", "--reweight-method mwnet"),
    ("deep fast", "--reweight-method deep"),
    ("deep fast, interval 4", "--reweight-method deep --meta-interval 4"),
    ("deep fast, meta batch 1/2", "--reweight-method deep --meta-max-tokens 512"),
    ("deep fast, refresh 4", "--reweight-method deep --meta-refresh 4 --meta-ema 0.9"),
    ("deep fast, refresh 8", "--reweight-method deep --meta-refresh 8 --meta-ema 0.9"),
    ("deep fast, interval 4, refresh 4", "--reweight-method deep --meta-interval 4 --meta-refresh 4 --meta-ema 0.9"),
    ("deep fast, refresh 4, source contrast",
     "--reweight-method deep --meta-refresh 4 --meta-ema 0.9 --teacher-inputs states,token_stats,source_contrast,progress"),
    ("deep fd", "--reweight-method deep --meta-grad fd"),
    ("deep exact", "--reweight-method deep --meta-grad exact"),
]
IMAGE_CONFIGS = [  # plain = --reweight-method none: the module's own SGD step on uniform weights
    ("plain", None),
    ("l2rw (default)", "--reweight-method l2rw"),
    ("mwnet (default)", "--reweight-method mwnet"),
    ("deep (default)", "--reweight-method deep"),  # fast on the last stage, refresh 4
    ("deep, fresh direction every update", "--reweight-method deep --meta-refresh 1 --meta-ema 0"),
    ("deep, classifier probe", "--reweight-method deep --meta-params fc"),
    ("deep, interval 4", "--reweight-method deep --meta-interval 4"),
    ("deep fd", "--reweight-method deep --meta-grad fd"),
    ("deep exact", "--reweight-method deep --meta-grad exact"),
]


# record_function labels of the task's train_step and fairseq's trainer
PHASES = ("meta_direction", "forward", "source_contrast", "meta_reference", "reweight", "backward", "reduce-grads",
          "clip-grads", "optimizer")


# ---------------------------------------------------------------------- workers
def _peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _serve(conn, step, device):
    """Answer ("run", k) with k update durations and ("mem",) with the peak memory increase."""
    import torch

    base = _current_bytes(device)
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg[0] == "run":
            times = []
            for _ in range(msg[1]):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t)
            conn.send(times)
        elif msg[0] == "mem":
            conn.send(max(_peak_bytes(device) - base, 0))
        elif msg[0] == "profile":  # where an update's time goes, by the record_function labels
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(msg[1]):
                    step()
            totals = {}
            for e in prof.key_averages():
                if e.key in PHASES:
                    totals[e.key] = e.cpu_time_total / 1e6 / msg[1]
            conn.send(totals)
        else:
            conn.send(None)
            return


def nmt_worker(conn, argv, threads):
    import torch

    torch.set_num_threads(threads)
    import fairseq_reweight.task  # noqa: F401  (registers the task; torch.load allow-list)
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    sys.argv = ["fairseq-train"] + argv  # fairseq's parsers also look at sys.argv (--user-dir)
    args = options.parse_args_and_arch(options.get_training_parser())
    cfg = convert_namespace_to_omegaconf(args)
    utils.import_user_module(cfg.common)
    torch.manual_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    trainer = Trainer(cfg, task, model, criterion)
    itr = task.get_batch_iterator(
        dataset=task.dataset("train"), max_tokens=cfg.dataset.max_tokens, max_sentences=cfg.dataset.batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        required_batch_size_multiple=1, seed=cfg.common.seed, num_workers=0,
    )
    epoch = [1, None]
    trainer.begin_epoch(1)

    def next_sample():
        if epoch[1] is None or not epoch[1].has_next():
            epoch[1] = itr.next_epoch_itr(shuffle=True)
        return next(epoch[1])

    _serve(conn, lambda: trainer.train_step([next_sample()]), trainer.device)


def image_worker(conn, argv, threads):
    import torch

    torch.set_num_threads(threads)
    from fairseq_reweight.image.cli import parse_config
    from fairseq_reweight.image.train import Trainer

    cfg = parse_config(argv)
    trainer = Trainer(cfg)
    _serve(conn, trainer.bench_step, trainer.device)


# ---------------------------------------------------------------------- configurations
def nmt_argvs(data, configs, extra, preset="tiny-cpu"):
    dry = subprocess.run(["bash", str(ROOT / "scripts/train_translation.sh"), "none", str(data), "/tmp/bench_speed",
                          "--dry-run", "--preset", preset], capture_output=True, text=True, check=True).stdout
    cmd = shlex.split(dry)
    cmd = cmd[cmd.index("fairseq-train") + 1:]
    i = cmd.index("--dump-weights")
    del cmd[i:i + 2]
    i = cmd.index("--reweight-method")
    del cmd[i:i + 2]
    cmd += extra
    plain = [a.replace("reweighted_translation", "translation").replace(
        "reweighted_label_smoothed_cross_entropy", "label_smoothed_cross_entropy") for a in cmd]
    cmd += ["--reweight-warmup", "0"]
    return [(name, plain if args is None else cmd + shlex.split(args)) for name, args in configs]


def image_argvs(configs, extra):
    base = ["--preset", "cpu", "--save-dir", "/tmp/bench_speed_image", "--no-progress"] + extra
    return [(name, base + ["--reweight-method", "none"] if args is None else base + shlex.split(args))
            for name, args in configs]


# ---------------------------------------------------------------------- driver
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("side", choices=["nmt", "image"])
    p.add_argument("--data", default=os.environ.get("BENCH_DATA", str(ROOT / "data-bin/multi30k_de_en_v8000_m1000_s1")),
                   help="nmt: a data-bin with a meta split (default $BENCH_DATA or the Multi30k data-bin of "
                        "scripts/prepare_multi30k.sh)")
    p.add_argument("--config", action="append", default=[], metavar="NAME=ARGS",
                   help="replace the built-in configurations (the first is the baseline; ARGS 'plain' = plain "
                        "fairseq translation / plain SGD)")
    p.add_argument("--rounds", type=int, default=6, help="rounds, the first of which is warm-up (default 6)")
    p.add_argument("--updates-per-round", type=int, default=8,
                   help="updates per round (default 8). Keep it a multiple of every --meta-interval/--meta-refresh "
                        "compared: a round's mean then covers whole cycles of cheap and meta updates (a median over "
                        "single updates would report only the cheap ones)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--preset", default="tiny-cpu", help="nmt: the student preset of scripts/train_translation.sh")
    p.add_argument("--out", default=None, help="write OUT.md and OUT.json (default: print only)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile N updates of every configuration and print seconds per update by phase")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    a = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    configs = NMT_CONFIGS if a.side == "nmt" else IMAGE_CONFIGS
    if a.config:
        configs = [(c.split("=", 1)[0], None if c.split("=", 1)[1] == "plain" else c.split("=", 1)[1])
                   for c in a.config]
    if a.side == "nmt":
        if not (Path(a.data) / "dict.en.txt").exists() and not list(Path(a.data).glob("meta.*.idx")):
            sys.exit(f"error: {a.data} is not a data-bin with a meta split: run scripts/prepare_multi30k.sh or "
                     "pass --data")
        argvs, target = nmt_argvs(a.data, configs, extra, a.preset), nmt_worker
    else:
        argvs, target = image_argvs(configs, extra), image_worker
    if a.rounds < 2:
        sys.exit("error: --rounds must be >= 2 (the first is warm-up)")

    ctx = mp.get_context("spawn")
    workers = []
    for name, argv_i in tqdm(argvs, desc="starting workers", leave=False):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=target, args=(child, [str(x) for x in argv_i], a.threads), daemon=True)
        proc.start()
        while not parent.poll(1):
            if not proc.is_alive():
                sys.exit(f"error: worker '{name}' failed to start (its error is above)")
        if parent.recv() != "ready":
            sys.exit(f"error: worker '{name}' did not start")
        workers.append((name, parent, proc))
    times = {name: [] for name, _, _ in workers}
    order = list(range(len(workers)))
    for r in tqdm(range(a.rounds), desc="rounds"):
        for k in order:
            name, conn, _ = workers[k]
            conn.send(("run", a.updates_per_round))
            t = conn.recv()
            if r > 0:
                times[name].append(statistics.fmean(t))
        order = order[1:] + order[:1]
    mem, profiles = {}, {}
    for name, conn, _ in workers:  # peak memory first: the profiler itself allocates
        conn.send(("mem",))
        mem[name] = conn.recv()
    if a.profile:
        for name, conn, _ in workers:
            conn.send(("profile", a.profile))
            profiles[name] = conn.recv()
    for name, conn, proc in workers:
        conn.send(("stop",))
        conn.recv()
        proc.join(30)

    base = workers[0][0]
    rows = []
    for name, _, _ in workers:
        med = statistics.median(times[name])
        rows.append({"config": name, "sec_per_update": med, "ratio": med / statistics.median(times[base]),
                     "peak_mem_mb": mem[name] / 2 ** 20, "mem_ratio": mem[name] / max(mem[base], 1),
                     "updates_timed": len(times[name]) * a.updates_per_round})
    lines = [f"| configuration | s/update (median over rounds of the round's mean) | × {base} | peak memory (MB) | "
             f"× {base} |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['sec_per_update']:.3f} | {r['ratio']:.2f} | {r['peak_mem_mb']:.0f} | "
              f"{r['mem_ratio']:.2f} |" for r in rows]
    table = "\n".join(lines)
    if profiles:
        cols = [ph for ph in PHASES if any(ph in prof for prof in profiles.values())]
        lines = ["", f"Seconds per update by phase (torch.profiler, {a.profile} updates each; nested labels "
                 "overlap: meta_direction and reweight run inside fairseq's train step):", "",
                 "| configuration | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{prof.get(c, 0.0):.3f}" for c in cols) + " |"
                  for name, prof in profiles.items()]
        table += "\n".join(lines)
    print(table)
    if a.out:
        cmd = "python scripts/bench_speed.py " + " ".join(shlex.quote(x) for x in argv)
        meta = {"command": cmd, "side": a.side, "rounds": a.rounds, "updates_per_round": a.updates_per_round,
                "threads": a.threads, "rows": rows, "profiles": profiles}
        Path(a.out + ".json").write_text(json.dumps(meta, indent=1) + "\n")
        Path(a.out + ".md").write_text(f"`{cmd}`\n\n{table}\n")
        print(f"wrote {a.out}.md and {a.out}.json")


if __name__ == "__main__":
    main()
