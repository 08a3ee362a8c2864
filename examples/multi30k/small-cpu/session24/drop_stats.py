"""What --drop-below left out by the end of a run: counts against the noise flags, from the task state that the
checkpoint holds (``task_state["drop"]["dropped"]``) and the data-bin's ``train.flags`` (1 = corrupted).

    python examples/multi30k/small-cpu/session24/drop_stats.py RUN_DIR/checkpoint_last.pt DATA-BIN [--json OUT]
"""

import argparse
import json

import numpy as np
import torch

import fairseq_reweight.compat  # noqa: F401  (torch.load of fairseq checkpoints)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("data")
    ap.add_argument("--json")
    a = ap.parse_args()
    state = torch.load(a.checkpoint, map_location="cpu", weights_only=False)["task_state"]
    if "drop" not in state or state["drop"] is None:
        raise SystemExit(f"{a.checkpoint}: no --drop-below state (trained without --drop-below?)")
    dropped = state["drop"]["dropped"].numpy().astype(bool)
    flags = np.loadtxt(f"{a.data}/train.flags", dtype=int)
    if len(flags) != len(dropped):
        raise SystemExit(f"{a.data}/train.flags has {len(flags)} lines, the checkpoint's training split {len(dropped)}")
    out = {"epoch": int(state["drop"]["epoch"]), "left_out": int(dropped.sum()), "of": len(dropped),
           "corrupted_left_out": float(dropped[flags == 1].mean()) if (flags == 1).any() else None,
           "clean_left_out": float(dropped[flags == 0].mean()),
           "corrupted_in_kept": float(flags[~dropped].mean())}
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
