"""Synthetic noise for parallel corpora, with a flags file saying which pairs were corrupted.

Corrupts exactly ``round(rate * N)`` of the N sentence pairs (chosen with ``--seed``) and writes
the corpus back in the same line order plus a flags file (one ``0``/``1`` per line, 1 = corrupted).
``fairseq-preprocess`` keeps line order, so line *i* of the flags file is the flag of sentence
id *i* of the binarized train split, i.e. of the ``id`` column of ``--dump-weights`` files
(``scripts/analyze_weights.py`` scores the weights against it).

Noise types (the text may be raw, tokenised or sentencepiece pieces: tokens are whitespace-split):

``misaligned``
    each corrupted pair gets the target of another corrupted pair (a random derangement of the
    chosen targets, so every target sentence is still used exactly once); never its own target,
    nor a target string equal to its own.
``random-target``
    each corrupted pair gets a target sentence drawn at random (with replacement) from the
    target side of the whole corpus, never one equal to its own target.
``copy``
    target := source (the untranslated-copy noise of web-crawled corpora).
``token``
    random token edits in the target (or ``--token-side src``/``both``): each token is, with
    probability ``--token-rate``, deleted, swapped with its right neighbour or replaced by a
    random token of that side's corpus vocabulary; every corrupted sentence gets at least one
    edit and never becomes empty.

Usage::

    python -m fairseq_reweight.noise --src train.de --tgt train.en --type misaligned --rate 0.3 \\
        --seed 1 --out-src noisy.de --out-tgt noisy.en --flags train.flags
"""

import argparse
import gzip
import io
import json
import random
import sys
from typing import List, Optional, Sequence, Tuple

TYPES = ("misaligned", "random-target", "copy", "token")
TOKEN_OPS = ("delete", "swap", "replace")


def num_corrupted(n: int, rate: float) -> int:
    """``round(rate * n)`` (Python's rounding), checked to be a valid count."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
    return min(n, int(round(rate * n)))


def choose(n: int, rate: float, seed: int) -> List[int]:
    """The sorted indices of the pairs to corrupt: exactly ``round(rate * n)`` of ``range(n)``."""
    return sorted(random.Random(f"choose-{seed}").sample(range(n), num_corrupted(n, rate)))


def _other(rng: random.Random, n: int, i: int, tgt: Sequence[str], tries: int = 1000) -> int:
    """A random index j != i whose target differs from ``tgt[i]``."""
    for _ in range(tries):
        j = rng.randrange(n)
        if j != i and tgt[j] != tgt[i]:
            return j
    candidates = [j for j in range(n) if tgt[j] != tgt[i]]
    if not candidates:
        raise ValueError(f"cannot corrupt pair {i}: every target sentence equals its target {tgt[i]!r}")
    return rng.choice(candidates)


def _misaligned(idx: List[int], tgt: List[str], rng: random.Random) -> List[str]:
    out = list(tgt)
    k = len(idx)
    if k == 0:
        return out
    if k == 1:
        i = idx[0]
        out[i] = tgt[_other(rng, len(tgt), i, tgt)]
        return out
    # Sattolo's algorithm: a uniformly random cyclic permutation, hence no fixed point.
    for attempt in range(20):
        perm = list(range(k))
        for a in range(k - 1, 0, -1):
            b = rng.randrange(a)
            perm[a], perm[b] = perm[b], perm[a]
        bad = [a for a in range(k) if tgt[idx[perm[a]]] == tgt[idx[a]]]
        if not bad:
            break
    for a in range(k):
        out[idx[a]] = tgt[idx[perm[a]]]
    for a in bad:  # duplicate sentences left after the retries: take a donor from the whole corpus
        i = idx[a]
        out[i] = tgt[_other(rng, len(tgt), i, tgt)]
    return out


def _random_target(idx: List[int], tgt: List[str], rng: random.Random) -> List[str]:
    out = list(tgt)
    for i in idx:
        out[i] = tgt[_other(rng, len(tgt), i, tgt)]
    return out


def _token_edit(tokens: List[str], vocab: List[str], rate: float, rng: random.Random) -> List[str]:
    """Edit ``tokens`` at ``rate``: at least one effective edit, and the sentence never becomes empty."""
    original = list(tokens)

    def apply(toks: List[str], pos: int, op: str) -> str:
        """Apply ``op`` at ``pos`` (falling back to a replacement where it cannot apply); returns what was done."""
        if op == "delete" and len(toks) > 1:
            del toks[pos]
            return "delete"
        if op == "swap" and pos + 1 < len(toks) and toks[pos] != toks[pos + 1]:
            toks[pos], toks[pos + 1] = toks[pos + 1], toks[pos]
            return "swap"
        for _ in range(8):
            v = rng.choice(vocab)
            if pos >= len(toks):
                toks.append(v)
                return "replace"
            if v != toks[pos]:
                toks[pos] = v
                return "replace"
        return "none"

    toks = list(tokens)
    pos = 0
    while pos < len(toks):
        if rng.random() < rate:
            done = apply(toks, pos, rng.choice(TOKEN_OPS))
            if done == "delete":
                continue  # the next token is now at `pos`
            if done == "swap":
                pos += 1  # do not touch the moved token again
        pos += 1
    for _ in range(100):  # no effective edit happened (or edits cancelled out): force one
        if toks != original:
            break
        apply(toks, rng.randrange(max(len(toks), 1)), rng.choice(TOKEN_OPS))
    return toks


def _token(idx: List[int], side: List[str], rate: float, rng: random.Random) -> List[str]:
    vocab = sorted({t for line in side for t in line.split()})
    if not vocab:
        raise ValueError("token noise needs a non-empty corpus")
    out = list(side)
    for i in idx:
        out[i] = " ".join(_token_edit(side[i].split(), vocab, rate, rng))
    return out


def corrupt(src: List[str], tgt: List[str], kind: str, rate: float, seed: int = 1, token_rate: float = 0.1,
            token_side: str = "tgt") -> Tuple[List[str], List[str], List[int]]:
    """Corrupt ``round(rate * N)`` pairs; returns ``(src', tgt', flags)`` in the input order."""
    if len(src) != len(tgt):
        raise ValueError(f"source and target have different lengths: {len(src)} vs {len(tgt)} lines")
    if kind not in TYPES:
        raise ValueError(f"unknown noise type {kind!r}; choose from {', '.join(TYPES)}")
    if not 0.0 < token_rate <= 1.0:
        raise ValueError(f"--token-rate must be in (0, 1], got {token_rate}")
    if token_side not in ("src", "tgt", "both"):
        raise ValueError(f"--token-side must be src, tgt or both, got {token_side!r}")
    src = [s.rstrip("\n") for s in src]
    tgt = [t.rstrip("\n") for t in tgt]
    n = len(src)
    idx = choose(n, rate, seed)
    rng = random.Random(f"{kind}-{seed}")
    new_src, new_tgt = list(src), list(tgt)
    if idx:
        if kind == "misaligned":
            new_tgt = _misaligned(idx, tgt, rng)
        elif kind == "random-target":
            new_tgt = _random_target(idx, tgt, rng)
        elif kind == "copy":
            for i in idx:
                new_tgt[i] = src[i]
        else:
            if token_side in ("tgt", "both"):
                new_tgt = _token(idx, tgt, token_rate, rng)
            if token_side in ("src", "both"):
                new_src = _token(idx, src, token_rate, rng)
    flags = [0] * n
    for i in idx:
        flags[i] = 1
    return new_src, new_tgt, flags


# ---------------------------------------------------------------------- files
def _open(path: str, mode: str = "rt"):
    if path == "-":
        return sys.stdin if "r" in mode else sys.stdout
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, mode.replace("t", "") or "rb"), encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def read_lines(path: str) -> List[str]:
    try:
        with _open(path, "rt") as f:
            return [line.rstrip("\n") for line in f]
    except FileNotFoundError:
        raise FileNotFoundError(f"input file not found: {path}") from None


def write_lines(path: str, lines: Sequence[str]) -> None:
    with _open(path, "wt") as f:
        f.write("".join(f"{line}\n" for line in lines))


def read_flags(path: str) -> List[int]:
    """Read a flags file (one 0/1 per line)."""
    flags = []
    for k, line in enumerate(read_lines(path)):
        v = line.strip()
        if v not in ("0", "1"):
            raise ValueError(f"{path}:{k + 1}: expected 0 or 1, got {line!r}")
        flags.append(int(v))
    return flags


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fairseq_reweight.noise",
        description="Corrupt a fraction of the sentence pairs of a parallel corpus and write a flags file "
                    "(1 = corrupted) aligned with the line order (= fairseq sentence ids after fairseq-preprocess).",
        epilog="Types: misaligned (target of another corrupted pair, never its own), random-target (a random "
               "target-side sentence), copy (target := source), token (random token deletions/swaps/"
               "replacements at --token-rate). Inputs may be .gz.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--src", required=True, help="source side, one sentence per line")
    p.add_argument("--tgt", required=True, help="target side, aligned with --src")
    p.add_argument("--out-src", required=True, help="corrupted source output (equal to --src except token noise "
                                                    "on the source side)")
    p.add_argument("--out-tgt", required=True, help="corrupted target output")
    p.add_argument("--flags", required=True, help="output flags file: one 0/1 per pair (1 = corrupted)")
    p.add_argument("--type", required=True, choices=TYPES, help="noise type")
    p.add_argument("--rate", type=float, required=True,
                   help="fraction of pairs to corrupt, in [0, 1) (exactly round(rate*N))")
    p.add_argument("--seed", type=int, default=1, help="random seed (the output is a function of inputs and seed)")
    p.add_argument("--token-rate", type=float, default=0.1, help="token noise: per-token edit probability")
    p.add_argument("--token-side", default="tgt", choices=("src", "tgt", "both"), help="token noise: which side")
    p.add_argument("--summary", default=None, help="optional JSON file with the settings and counts")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    if not 0.0 <= args.rate < 1.0:  # also refuses nan
        print(f"error: --rate must be in [0, 1), got {args.rate}: it is the fraction of pairs to corrupt, e.g. "
              "--rate 0.3 (at 1 no clean pair would be left to learn from)", file=sys.stderr)
        return 2

    try:
        src, tgt = read_lines(args.src), read_lines(args.tgt)
        if not args.quiet:
            print(f"[noise] read {len(src)} pairs from {args.src} / {args.tgt}", file=sys.stderr)
        new_src, new_tgt, flags = corrupt(src, tgt, args.type, args.rate, args.seed, args.token_rate,
                                          args.token_side)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_lines(args.out_src, new_src)
    write_lines(args.out_tgt, new_tgt)
    write_lines(args.flags, [str(f) for f in flags])
    k = sum(flags)
    if args.summary:
        with open(args.summary, "w", encoding="utf-8") as f:
            json.dump({"type": args.type, "rate": args.rate, "seed": args.seed, "token_rate": args.token_rate,
                       "token_side": args.token_side, "pairs": len(flags), "corrupted": k}, f, indent=1)
            f.write("\n")
    if not args.quiet:
        print(f"[noise] {args.type}: corrupted {k}/{len(flags)} pairs ({k / max(len(flags), 1):.1%}), seed "
              f"{args.seed}; wrote {args.out_src}, {args.out_tgt}, flags {args.flags}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
