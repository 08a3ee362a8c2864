"""fairseq_reweight.noise: exact counts, determinism, no self-alignment, flags aligned with fairseq's ids."""

import random
import subprocess
import sys
from collections import Counter

import pytest

from fairseq_reweight import noise
from fairseq_reweight.noise import TYPES, corrupt, num_corrupted

from conftest import ROOT, preprocess


def _corpus(n=200, seed=0, dup_every=0):
    rng = random.Random(seed)
    src, tgt = [], []
    for i in range(n):
        words = [f"w{rng.randrange(50)}" for _ in range(rng.randint(2, 9))]
        if dup_every and i % dup_every == 0:
            words = ["same", "sentence"]  # many identical pairs
        src.append(" ".join(words))
        tgt.append(" ".join(w.upper() for w in reversed(words)))
    return src, tgt


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("n,rate", [(200, 0.3), (101, 0.25), (7, 0.5), (50, 0.0), (50, 1.0), (3, 0.34)])
def test_exact_count_and_untouched_pairs(kind, n, rate):
    src, tgt = _corpus(n)
    new_src, new_tgt, flags = corrupt(src, tgt, kind, rate, seed=3, token_rate=0.2)
    assert len(flags) == len(new_src) == len(new_tgt) == n
    assert set(flags) <= {0, 1}
    assert sum(flags) == round(rate * n) == num_corrupted(n, rate)
    for i in range(n):
        if not flags[i]:
            assert (new_src[i], new_tgt[i]) == (src[i], tgt[i])
        else:
            assert (new_src[i], new_tgt[i]) != (src[i], tgt[i]), f"{kind}: flagged pair {i} unchanged"
        assert new_tgt[i].strip() and new_src[i].strip()


@pytest.mark.parametrize("kind", TYPES)
def test_deterministic_given_seed(kind):
    src, tgt = _corpus(300)
    a = corrupt(src, tgt, kind, 0.3, seed=5)
    assert a == corrupt(src, tgt, kind, 0.3, seed=5)
    b = corrupt(src, tgt, kind, 0.3, seed=6)
    assert a[2] != b[2] or a[1] != b[1]


def test_misaligned_is_a_derangement_of_the_chosen_targets():
    src, tgt = _corpus(500)
    _, new_tgt, flags = corrupt(src, tgt, "misaligned", 0.3, seed=1)
    chosen = [i for i, f in enumerate(flags) if f]
    # every corrupted pair gets the target of another corrupted pair, each used once
    assert Counter(new_tgt[i] for i in chosen) == Counter(tgt[i] for i in chosen)
    assert all(new_tgt[i] != tgt[i] for i in chosen)
    # a corrupted target is never the translation of its own source
    assert all(new_tgt[i] != " ".join(w.upper() for w in reversed(src[i].split())) for i in chosen)


@pytest.mark.parametrize("seed", range(5))
def test_misaligned_never_self_with_duplicates_and_tiny_counts(seed):
    src, tgt = _corpus(60, seed=seed, dup_every=2)  # half the pairs are the same sentence
    for rate in (1 / 60, 2 / 60, 0.5, 1.0):
        _, new_tgt, flags = corrupt(src, tgt, "misaligned", rate, seed=seed)
        assert sum(flags) == round(rate * 60)
        assert all(new_tgt[i] != tgt[i] for i, f in enumerate(flags) if f)


def test_random_target_and_copy():
    src, tgt = _corpus(300)
    _, new_tgt, flags = corrupt(src, tgt, "random-target", 0.4, seed=2)
    pool = set(tgt)
    assert all(new_tgt[i] in pool and new_tgt[i] != tgt[i] for i, f in enumerate(flags) if f)
    new_src, new_tgt, flags = corrupt(src, tgt, "copy", 0.4, seed=2)
    assert new_src == src
    assert all(new_tgt[i] == src[i] for i, f in enumerate(flags) if f)


def test_token_noise_edits_at_rate_and_side():
    src, tgt = _corpus(400)
    new_src, new_tgt, flags = corrupt(src, tgt, "token", 1.0, seed=4, token_rate=0.15)
    assert new_src == src  # target side by default
    vocab = {t for line in tgt for t in line.split()}
    assert all(set(line.split()) <= vocab for line in new_tgt)
    changed = sum(a != b for x, y in zip(tgt, new_tgt) for a, b in zip(x.split(), y.split()))
    total = sum(len(x.split()) for x in tgt)
    assert 0.05 < changed / total < 0.6
    s2, t2, _ = corrupt(src, tgt, "token", 0.5, seed=4, token_side="both")
    assert s2 != src and t2 != tgt
    # one-token sentences are never emptied
    s1, t1, f1 = corrupt(["a"] * 20, ["x"] * 10 + ["y"] * 10, "token", 1.0, seed=0, token_rate=1.0)
    assert sum(f1) == 20 and all(t.strip() for t in t1) and all(a != b for a, b in zip(t1, ["x"] * 10 + ["y"] * 10))


def test_errors():
    with pytest.raises(ValueError, match="different lengths"):
        corrupt(["a"], ["b", "c"], "copy", 0.5)
    with pytest.raises(ValueError, match="rate"):
        corrupt(["a"], ["b"], "copy", 1.5)
    with pytest.raises(ValueError, match="unknown noise type"):
        corrupt(["a"], ["b"], "shuffle", 0.5)
    with pytest.raises(ValueError, match="every target sentence equals"):
        corrupt(["a", "b"], ["x", "x"], "misaligned", 0.5)


def test_cli(tmp_path):
    src, tgt = _corpus(40)
    (tmp_path / "in.de").write_text("\n".join(src) + "\n")
    (tmp_path / "in.en").write_text("\n".join(tgt) + "\n")
    args = ["--src", tmp_path / "in.de", "--tgt", tmp_path / "in.en", "--out-src", tmp_path / "o.de",
            "--out-tgt", tmp_path / "o.en", "--flags", tmp_path / "f", "--type", "misaligned", "--rate", "0.25",
            "--seed", "7", "--summary", tmp_path / "s.json"]
    p = subprocess.run([sys.executable, "-m", "fairseq_reweight.noise"] + [str(a) for a in args], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "corrupted 10/40" in p.stderr
    flags = noise.read_flags(str(tmp_path / "f"))
    assert sum(flags) == 10 and len(flags) == 40
    assert (tmp_path / "o.en").read_text().splitlines() == corrupt(src, tgt, "misaligned", 0.25, seed=7)[1]
    # in-process entry point: missing input is a clear error, not a traceback
    assert noise.main(["--src", str(tmp_path / "nope"), "--tgt", str(tmp_path / "in.en"), "--out-src", "x",
                       "--out-tgt", "y", "--flags", "z", "--type", "copy", "--rate", "0.1"]) == 2


def test_flags_align_with_binarized_ids(tmp_path):
    """The flags (line order) index the sentence ids of fairseq-preprocess's train split."""
    from fairseq.data import Dictionary, LanguagePairDataset, data_utils

    rng = random.Random(0)
    n = 60
    src = [f"s{i} " + " ".join(f"a{rng.randrange(9)}" for _ in range(rng.randint(1, 5))) for i in range(n)]
    tgt = [f"t{i} " + " ".join(f"b{rng.randrange(9)}" for _ in range(rng.randint(1, 5))) for i in range(n)]
    new_src, new_tgt, flags = corrupt(src, tgt, "misaligned", 0.3, seed=1)
    raw = tmp_path / "raw"
    raw.mkdir()
    for split, (s, t) in {"train": (new_src, new_tgt), "valid": (src[:5], tgt[:5]), "test": (src[:5], tgt[:5])}.items():
        (raw / f"{split}.src").write_text("\n".join(s) + "\n")
        (raw / f"{split}.tgt").write_text("\n".join(t) + "\n")
    dest = preprocess(raw, tmp_path / "bin", meta=False)

    sd, td = Dictionary.load(str(dest / "dict.src.txt")), Dictionary.load(str(dest / "dict.tgt.txt"))
    s_ds = data_utils.load_indexed_dataset(str(dest / "train.src-tgt.src"), sd)
    t_ds = data_utils.load_indexed_dataset(str(dest / "train.src-tgt.tgt"), td)
    ds = LanguagePairDataset(s_ds, s_ds.sizes, sd, t_ds, t_ds.sizes, td, shuffle=True)
    assert len(ds) == len(flags) == n
    for i in range(n):
        item = ds[i]
        assert item["id"] == i
        assert sd.string(item["source"]) == new_src[i]
        decoded = td.string(item["target"])
        assert decoded == new_tgt[i]
        # the flag of id i says whether its target is the one of its own source
        assert (decoded.split()[0] != f"t{i}") == bool(flags[i])
    batch = ds.collater([ds[i] for i in ds.ordered_indices()[:16]])
    for k, i in enumerate(batch["id"].tolist()):
        t = batch["target"][k]
        assert td.string(t[t != td.pad()]) == new_tgt[i]
