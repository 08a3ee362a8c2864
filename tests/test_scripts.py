"""The data-preparation, training, evaluation and analysis scripts on tiny stand-in data."""

import gzip
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import BIN, ROOT

SCRIPTS = ROOT / "scripts"
ENV = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONWARNINGS="ignore")


def sh(cmd, env=None, check=True):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=dict(ENV, **(env or {})),
                       cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}")
    return p


def helpers():
    spec = importlib.util.spec_from_file_location("mt_helpers", SCRIPTS / "mt_helpers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _toy_pairs(rng, n):
    src, tgt = [], []
    for _ in range(n):
        words = [f"a{rng.randrange(20)}" for _ in range(rng.randint(3, 8))]
        src.append(" ".join(words).capitalize() + ".")
        tgt.append(" ".join("b" + w[1:] for w in reversed(words)).capitalize() + ".")
    return src, tgt


@pytest.fixture(scope="module")
def multi30k_raw(tmp_path_factory):
    """A tiny stand-in of the raw Multi30k task-1 files."""
    d = tmp_path_factory.mktemp("m30k_raw")
    rng = random.Random(0)
    for name, n in (("train", 240), ("val", 30), ("test_2016_flickr", 25)):
        src, tgt = _toy_pairs(rng, n)
        for lang, lines in (("de", src), ("en", tgt)):
            with gzip.open(d / f"{name}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.write("".join(x + "\n" for x in lines))
    return d


@pytest.fixture(scope="module")
def noisy_bin(multi30k_raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("m30k_bin") / "noisy"
    p = sh([SCRIPTS / "prepare_multi30k.sh", "--vocab", "60", "--meta-size", "20", "--seed", "3", "--noise",
            "misaligned", "--noise-rate", "0.3", "--out", out], env={"MULTI30K_DIR": str(multi30k_raw)})
    return out, p


# ---------------------------------------------------------------------------------------------- help / errors
@pytest.mark.parametrize("script", ["prepare_multi30k.sh", "prepare_iwslt14.sh", "train_translation.sh",
                                    "eval_bleu.sh", "run_multi30k_benchmark.sh", "analyze_weights.py",
                                    "mt_helpers.py", "benchmark_report.py", "meta_signal.py", "quickstart.sh"])
def test_help(script):
    cmd = [SCRIPTS / script, "--help"] if script.endswith(".sh") else [sys.executable, SCRIPTS / script, "--help"]
    p = sh(cmd)
    assert "usage" in p.stdout.lower() and len(p.stdout) > 200


def test_clear_errors_on_missing_input(tmp_path):
    p = sh([SCRIPTS / "prepare_multi30k.sh", "--out", tmp_path / "x"], env={"MULTI30K_DIR": str(tmp_path)},
           check=False)
    assert p.returncode == 2 and "MULTI30K_DIR" in p.stderr and "lacks" in p.stderr
    p = sh([SCRIPTS / "prepare_iwslt14.sh", "--raw-dir", tmp_path, "--out", tmp_path / "y"], check=False)
    assert p.returncode == 2 and "neither de-en/ nor de-en.tgz" in p.stderr
    p = sh([SCRIPTS / "train_translation.sh", "deep", tmp_path / "nope", tmp_path / "ck"], check=False)
    assert p.returncode == 2 and "not found" in p.stderr
    p = sh([SCRIPTS / "train_translation.sh", "best", tmp_path, tmp_path / "ck"], check=False)
    assert p.returncode == 2 and "METHOD must be" in p.stderr
    p = sh([SCRIPTS / "eval_bleu.sh", tmp_path, tmp_path / "missing.pt"], check=False)
    assert p.returncode == 2 and "checkpoint" in p.stderr and "not found" in p.stderr
    p = sh([sys.executable, SCRIPTS / "analyze_weights.py", "--weights", tmp_path / "w.tsv", "--flags",
            tmp_path / "f"], check=False)
    assert p.returncode == 2 and "not found" in p.stderr
    p = sh([SCRIPTS / "prepare_multi30k.sh", "--noise", "misaligned"], check=False)
    assert p.returncode == 2 and "--noise-rate" in p.stderr
    for rate in ("1", "1.0", "-0.1", "abc"):
        p = sh([SCRIPTS / "prepare_multi30k.sh", "--noise", "misaligned", "--noise-rate", rate,
                "--out", tmp_path / "out"], check=False)
        assert p.returncode == 2 and "--noise-rate in (0, 1)" in p.stderr and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- prepare_multi30k.sh
def test_prepare_multi30k(noisy_bin, multi30k_raw):
    from fairseq.data import Dictionary, data_utils

    out, p = noisy_bin
    assert "meta hold-out" in p.stderr and "fairseq-preprocess" in p.stderr  # progress output
    for split in ("train", "valid", "test", "meta"):
        for lang in ("de", "en"):
            assert (out / f"{split}.de-en.{lang}.bin").exists(), split
    d = Dictionary.load(str(out / "dict.en.txt"))
    sizes = {s: len(data_utils.load_indexed_dataset(str(out / f"{s}.de-en.en"), d)) for s in
             ("train", "valid", "test", "meta")}
    assert sizes == {"train": 220, "valid": 30, "test": 25, "meta": 20}
    flags = [int(x) for x in (out / "train.flags").read_text().split()]
    assert len(flags) == sizes["train"] and sum(flags) == round(0.3 * 220)

    raw_de = gzip.open(multi30k_raw / "train.de.gz", "rt").read().splitlines()
    raw_en = gzip.open(multi30k_raw / "train.en.gz", "rt").read().splitlines()
    train_ids = [int(x) for x in (out / "text" / "train.orig_ids").read_text().split()]
    meta_ids = [int(x) for x in (out / "text" / "meta.orig_ids").read_text().split()]
    assert not set(train_ids) & set(meta_ids) and len(set(train_ids) | set(meta_ids)) == 240
    # the meta split is clean: its pairs are the raw pairs
    meta_en = (out / "text" / "meta.en").read_text().splitlines()
    assert meta_en == [raw_en[i] for i in meta_ids]
    # flags line i <-> binarized train sentence i: corrupted iff its target is not its own translation
    train_de = (out / "text" / "train.de").read_text().splitlines()
    train_en = (out / "text" / "train.en").read_text().splitlines()
    assert train_de == [raw_de[i] for i in train_ids]
    for i, f in enumerate(flags):
        assert (train_en[i] != raw_en[train_ids[i]]) == bool(f)
    # the binarized train targets are the (noisy) text, in order
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    ds = data_utils.load_indexed_dataset(str(out / "train.de-en.en"), d)
    for i in (0, 7, 100, 219):
        assert sp.decode_pieces(d.string(ds[i]).split()) == train_en[i]
    assert (out / "ref" / "test.en").read_text().splitlines() == \
        gzip.open(multi30k_raw / "test_2016_flickr.en.gz", "rt").read().splitlines()
    info = json.loads((out / "prepare.json").read_text())
    assert info["corrupted"] == sum(flags) and info["sizes"]["meta"] == 20

    # re-running skips the finished steps; other options on the same folder are refused
    p2 = sh([SCRIPTS / "prepare_multi30k.sh", "--vocab", "60", "--meta-size", "20", "--seed", "3", "--noise",
             "misaligned", "--noise-rate", "0.3", "--out", out], env={"MULTI30K_DIR": str(multi30k_raw)})
    assert p2.stderr.count("skipped") >= 4 and "fairseq-preprocess: train" not in p2.stderr
    p3 = sh([SCRIPTS / "prepare_multi30k.sh", "--vocab", "60", "--meta-size", "21", "--seed", "3", "--out", out],
            env={"MULTI30K_DIR": str(multi30k_raw)}, check=False)
    assert p3.returncode == 2 and "other options" in p3.stderr


def test_prepare_multi30k_en_de_direction(multi30k_raw, tmp_path):
    out = tmp_path / "ende"
    sh([SCRIPTS / "prepare_multi30k.sh", "--src", "en", "--tgt", "de", "--vocab", "60", "--meta-size", "10",
        "--raw-dir", multi30k_raw, "--out", out])
    assert (out / "train.en-de.de.idx").exists() and (out / "meta.en-de.en.idx").exists()
    assert (out / "ref" / "test.de").exists()
    assert set((out / "train.flags").read_text().split()) == {"0"}


# ---------------------------------------------------------------------------------------------- prepare_iwslt14.sh
def _write_iwslt_standin(orig: Path, rng):
    orig.mkdir(parents=True)
    src, tgt = _toy_pairs(rng, 60)
    header = {"de": ["<url>http://www.ted.com/talks/x.html</url>", "<keywords>talks, de</keywords>",
                     "<talkid>1</talkid>", "<title>Titel eins</title>", "<description>Beschreibung</description>"],
              "en": ["<url>http://www.ted.com/talks/x.html</url>", "<keywords>talks, en</keywords>",
                     "<talkid>1</talkid>", "<title>Title one</title>", "<description>Description</description>"]}
    for lang, lines in (("de", src), ("en", tgt)):
        (orig / f"train.tags.de-en.{lang}").write_text("\n".join(header[lang] + lines[:30] + header[lang] + lines[30:])
                                                      + "\n")
    for k, name in enumerate(("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
                              "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012")):
        s, t = _toy_pairs(rng, 3 + k)
        for lang, lines in (("de", s), ("en", t)):
            segs = "\n".join(f'<seg id="{i + 1}"> {x.replace("a1 ", "a1’s ")} </seg>' for i, x in enumerate(lines))
            (orig / f"{name}.de-en.{lang}.xml").write_text(
                f'<?xml version="1.0" encoding="UTF-8"?>\n<mteval>\n<srcset setid="x" srclang="{lang}">\n'
                f'<doc docid="1" genre="lectures">\n<url>u</url>\n<talkid>1</talkid>\n{segs}\n</doc>\n</srcset>\n</mteval>\n')


def test_iwslt_text_helpers(tmp_path):
    h = helpers()
    f = tmp_path / "x.xml"
    f.write_text('<doc>\n<seg id="1"> Das ist’s. </seg>\n<talkid>3</talkid>\n<seg id="2">Zwei</seg>\n</doc>\n')
    assert h.iwslt_xml_lines(f) == ["Das ist's.", "Zwei"]
    t = tmp_path / "train.tags"
    t.write_text("<url>u</url>\n<title>A title</title>\nplain line\n<keywords>k</keywords>\n<talkid>2</talkid>\n")
    assert h.iwslt_train_lines(t) == ["A title", "plain line"]
    s, tt = h.clean_pairs(["a b", "a b c d", "", "x"], ["c d", "e", "f", "y " * 3], ratio=1.5)
    assert (s, tt) == (["a b"], ["c d"])


def test_prepare_iwslt14_offline(tmp_path):
    raw = tmp_path / "raw"
    _write_iwslt_standin(raw / "de-en", random.Random(1))
    out = tmp_path / "bin"
    p = sh([SCRIPTS / "prepare_iwslt14.sh", "--raw-dir", raw, "--vocab", "60", "--meta-size", "5", "--noise",
            "copy", "--noise-rate", "0.2", "--workers", "1", "--out", out])
    assert "[iwslt]" in p.stderr and "fairseq-preprocess" in p.stderr
    info = json.loads((out / "prepare.json").read_text())
    # 60 pairs + 2x2 title/description lines per side = 64; every 23rd is valid (2), 5 go to meta
    assert info["sizes"] == {"train": 64 - 2 - 5, "valid": 2, "test": 3 + 4 + 5 + 6 + 7, "meta": 5}
    txt = (out / "text" / "raw" / "train.en").read_text()
    assert "<url>" not in txt and "<title>" not in txt and "Title one" in txt
    test_de = (out / "ref" / "test.de").read_text()
    assert "<seg" not in test_de and "’" not in test_de
    assert sum(int(x) for x in (out / "train.flags").read_text().split()) == round(0.2 * 57)
    for split in ("train", "valid", "test", "meta"):
        assert (out / f"{split}.de-en.de.idx").exists()


# ---------------------------------------------------------------------------------------------- train_translation.sh
def test_train_translation_command(noisy_bin, tmp_path):
    data, _ = noisy_bin

    def cmd(method, *extra):  # as in a shell without OMP_NUM_THREADS set
        env = {k: v for k, v in dict(ENV).items() if k != "OMP_NUM_THREADS"}
        p = subprocess.run([str(c) for c in [SCRIPTS / "train_translation.sh", method, data, tmp_path / "ck",
                                             "--dry-run", *extra]], capture_output=True, text=True, env=env, cwd=ROOT)
        assert p.returncode == 0, p.stderr
        return p.stdout.split()

    deep = cmd("deep", "--seed", "4", "--max-tokens", "77")
    assert deep[:2] == ["OMP_NUM_THREADS=1", "fairseq-train"]  # one CPU thread unless asked otherwise
    assert "--cpu" in deep and "--no-epoch-checkpoints" in deep and "--required-batch-size-multiple" in deep
    assert deep[deep.index("--reweight-method") + 1] == "deep"
    assert "--teacher-lr" not in deep and deep[deep.index("--meta-subset") + 1] == "meta"  # the task's recipe decides
    mw = cmd("mwnet", "--teacher-lr", "2e-4")
    assert mw[mw.index("--teacher-lr") + 1] == "2e-4" and mw.count("--teacher-lr") == 1
    assert deep[deep.index("--seed") + 1] == "4"
    assert deep[deep.index("--dump-weights") + 1] == str(tmp_path / "ck" / "weights.tsv")
    assert deep[-2:] == ["--max-tokens", "77"]  # extra arguments come last and override the preset
    for m in ("none", "l2rw"):
        c = cmd(m)
        assert "--teacher-lr" not in c and "--dump-weights" in c
    assert "--meta-subset" not in cmd("none")
    assert "--teacher-lr" not in cmd("mwnet")  # the task sets it (1e-3 for mwnet)
    assert cmd("none", "--threads", "2")[0] == "OMP_NUM_THREADS=2"
    gpu = cmd("none", "--gpu", "--max-update", "9")
    assert "--cpu" not in gpu and gpu[0] == "fairseq-train" and gpu[gpu.index("--max-update", gpu.index("--max-update") + 1) + 1] == "9"
    iw = cmd("none", "--preset", "iwslt")
    assert iw[iw.index("--arch") + 1] == "transformer_iwslt_de_en" and "--cpu" not in iw
    no_meta = tmp_path / "nometa"
    no_meta.mkdir()
    for f in data.glob("*"):
        if f.is_file() and not f.name.startswith("meta."):
            os.symlink(f, no_meta / f.name)
    p = sh([SCRIPTS / "train_translation.sh", "deep", no_meta, tmp_path / "ck"], check=False)
    assert p.returncode == 2 and "meta split" in p.stderr


TINY_MODEL = ["--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32",
              "--decoder-ffn-embed-dim", "32", "--encoder-layers", "1", "--decoder-layers", "1",
              "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--max-tokens", "300",
              "--log-interval", "1"]


def test_train_eval_analyze_end_to_end(noisy_bin, tmp_path, monkeypatch):
    """train_translation.sh (deep, 3 updates) -> eval_bleu.sh -> analyze_weights.py on the tiny data-bin."""
    data, _ = noisy_bin
    ck = tmp_path / "deep"
    sh([SCRIPTS / "train_translation.sh", "deep", data, ck, "--max-update", "3", *TINY_MODEL])
    assert (ck / "checkpoint_last.pt").exists() and "done training" in (ck / "train.log").read_text()
    p = sh([SCRIPTS / "eval_bleu.sh", data, ck / "checkpoint_last.pt", "--max-len-b", "10", "--max-len-a", "0"])
    assert "BLEU = " in p.stdout and "nrefs:1|case:mixed|eff:no|tok:13a" in p.stdout and "chrF = " in p.stdout
    res = json.loads((ck / "bleu_test.json").read_text())
    assert res["sentences"] == 25 and "bleu" in res and "chrf" in res
    assert len((ck / "hyp_test.txt").read_text().splitlines()) == 25
    p = sh([sys.executable, SCRIPTS / "analyze_weights.py", "--weights", ck / "weights.tsv", "--flags",
            data / "train.flags", "--windows", "3"])
    ana = json.loads((ck / "weights_analysis.json").read_text())
    assert ana["updates"] == [0, 2] and ana["auc_all"] is not None and 0 <= ana["auc_all"] <= 1
    assert (ck / "weights_hist.png").stat().st_size > 1000
    _check_meta_signal(data, ck, monkeypatch)


def _check_meta_signal(data, ck, monkeypatch):
    """meta_signal.py: the CLI's report, and its per-sentence scores against a central finite difference."""
    import torch

    sh([sys.executable, SCRIPTS / "meta_signal.py", "--checkpoint", ck / "checkpoint_last.pt", "--data", data,
        "--num", "40", "--teacher-ceiling", "--teacher-inputs", "states,token_stats,length_ratio,source_contrast,progress", "--out",
        ck / "signal"])
    res = json.loads((ck / "signal.json").read_text())
    assert res["pairs"] == 40 and 0 < res["corrupted_fraction"] < 1
    assert all(0 <= g["auc"] <= 1 for g in res["groups"].values()) and res["groups"]["all"]["share"] == 1.0
    assert "| encoder |" in (ck / "signal.md").read_text()
    ceiling = res["teacher_ceiling"]
    assert ceiling["inputs"] == 16 + 5 + 2 and all(0 <= ceiling[g] <= 1 for g in res["groups"])
    assert "--teacher-inputs states,token_stats,length_ratio,source_contrast,progress`" in (ck / "signal.md").read_text()

    spec = importlib.util.spec_from_file_location("meta_signal", SCRIPTS / "meta_signal.py")
    ms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ms)
    model, task = ms.load(ck / "checkpoint_last.pt", data)
    import fairseq.utils  # fairseq's (log-)softmax casts to float32: float64 end to end for the finite difference

    monkeypatch.setattr(fairseq.utils, "log_softmax", lambda x, dim, onnx_trace=False: x.log_softmax(dim))
    monkeypatch.setattr(fairseq.utils, "softmax", lambda x, dim, onnx_trace=False: x.softmax(dim))
    model.double()
    task.load_dataset("train")
    task.load_dataset("meta")
    train, pad = task.datasets["train"], task.target_dictionary.pad()
    gm = ms.meta_gradient(model, task.datasets["meta"], pad)
    ids = [0, 5, 11]
    scores, loss, ntok, gnorm = ms.sentence_scores(model, train, ids, gm, pad, progress=False)
    parts = ["embed", "encoder", "encoder.attn", "decoder", "decoder.self_attn", "decoder.cross_attn", "other"]
    np.testing.assert_allclose(sum(scores[g] for g in parts), scores["all"], rtol=1e-9)  # a partition
    params = dict(model.named_parameters())
    norm = sum(float((g ** 2).sum()) for g in gm.values()) ** 0.5
    eps = 1e-4 / norm
    with torch.no_grad():
        def losses(sign):
            for n, g in gm.items():
                params[n].add_(sign * eps * g)
            out = [float(ms.sentence_nll(model, train.collater([train[i]]), pad)[0]) for i in ids]
            for n, g in gm.items():
                params[n].sub_(sign * eps * g)
            return np.array(out)
        fd = (losses(1) - losses(-1)) / (2 * eps)
    np.testing.assert_allclose(scores["all"], fd, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- analyze_weights.py
def test_analyze_weights_synthetic(tmp_path):
    rng = np.random.default_rng(0)
    n = 100
    flags = np.zeros(n, dtype=int)
    flags[rng.choice(n, 30, replace=False)] = 1
    (tmp_path / "train.flags").write_text("".join(f"{f}\n" for f in flags))
    rows = ["update\tid\tweight\tloss"]
    for u in range(40):
        ids = rng.choice(n, 20, replace=False)
        for i in ids:
            if u < 20:
                w = 1.0  # uniform: AUC 0.5
            else:  # separated: every clean weight above every corrupted one -> AUC 1
                w = 1.2 + 0.1 * rng.random() if flags[i] == 0 else 0.3 + 0.1 * rng.random()
            rows.append(f"{u}\t{i}\t{w:.4f}\t{5.0 + flags[i]:.3f}")
    rows.insert(200, "update\tid\tweight\tloss")  # a repeated header (resumed run)
    rows.append(rows[-1].replace("\t1.", "\t9.") if "\t1." in rows[-1] else rows[-1])  # a repeated row
    (tmp_path / "w.tsv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "ana"
    p = sh([sys.executable, SCRIPTS / "analyze_weights.py", "--weights", tmp_path / "w.tsv", "--flags",
            tmp_path / "train.flags", "--out-dir", out, "--windows", "4", "--bins", "20", "--last-frac", "0.25"])
    res = json.loads((out / "weights_analysis.json").read_text())
    assert res["rows"] == 800 and res["updates"] == [0, 39] and res["last_from_update"] == 30
    assert [c["auc"] for c in res["curve"]] == [0.5, 0.5, 1.0, 1.0]
    assert res["auc_last"] == 1.0 and res["auc_last_sentence_mean"] == 1.0
    assert res["auc_last_neg_loss"] == 1.0  # the corrupted pairs have the higher loss here
    assert abs(res["auc_all"] - 0.875) < 0.03  # pooled: (1/2 + 1 + 1 + 1) / 4
    assert (out / "weights_hist.png").stat().st_size > 1000 and (out / "weights_auc.png").stat().st_size > 1000
    assert "AUC (last 25%" in p.stdout

    (tmp_path / "short.flags").write_text("0\n1\n")
    p = sh([sys.executable, SCRIPTS / "analyze_weights.py", "--weights", tmp_path / "w.tsv", "--flags",
            tmp_path / "short.flags", "--no-plots"], check=False)
    assert p.returncode == 2 and "flags file has only 2 lines" in p.stderr


def test_analyze_weights_counts_left_out_sentences_at_weight_zero(tmp_path):
    """With --checkpoint of a --drop-below run: the sentences it left out score 0 (they get no weight any more), the
    others their mean weight over the last part; the AUC against a brute-force pairwise count. The rows alone rank
    only the filter's survivors (here at random: about 0.5)."""
    import torch

    rng = np.random.default_rng(1)
    n = 100
    flags = np.zeros(n, dtype=int)
    flags[:30] = 1
    left_out = np.zeros(n, dtype=bool)
    left_out[:25] = True  # 25 of the 30 corrupted
    left_out[30:35] = True  # and 5 clean
    (tmp_path / "train.flags").write_text("".join(f"{f}\n" for f in flags))
    rows, sums, counts = ["update\tid\tweight\tloss"], np.zeros(n), np.zeros(n)
    for u in range(10):
        for i in rng.choice(np.flatnonzero(~left_out), 40, replace=False):
            w = float(np.round(0.5 + rng.random(), 4))
            rows.append(f"{u}\t{i}\t{w}\t5.0")
            if u >= 5:
                sums[i], counts[i] = sums[i] + w, counts[i] + 1
    (tmp_path / "w.tsv").write_text("\n".join(rows) + "\n")
    # the corpus pass's contrast (NLL given another source, given its own): separates every pair but the five
    # corrupted ones still trained on, which it puts above every clean pair
    contrast = np.where(flags == 1, 0.0, 1.0) + 0.01 * rng.random(n)
    contrast[25:30] = 5.0
    rows_c = torch.from_numpy(np.stack([contrast + 2.0, np.full(n, 2.0)], 1))
    torch.save({"extra_state": {"ReweightedTranslationTask": {"drop": {"dropped": torch.from_numpy(left_out)},
                                                              "source_contrast": {"train": rows_c, "meta": rows_c}}}},
               tmp_path / "checkpoint_last.pt")
    p = sh([sys.executable, SCRIPTS / "analyze_weights.py", "--weights", tmp_path / "w.tsv", "--flags",
            tmp_path / "train.flags", "--checkpoint", tmp_path / "checkpoint_last.pt", "--last-frac", "0.5",
            "--out-dir", tmp_path])
    # reading the checkpoint imports fairseq, whose import turns the root logger to DEBUG: the plots must not flood
    # the main job's output with matplotlib's debug lines
    assert "DEBUG" not in p.stderr and (tmp_path / "weights_hist.png").exists(), p.stderr[-2000:]
    res = json.loads((tmp_path / "weights_analysis.json").read_text())
    score = np.where(left_out, 0.0, sums / np.maximum(counts, 1))
    use = left_out | (counts > 0)
    pos, neg = score[use & (flags == 0)], score[use & (flags == 1)]
    expected = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert abs(res["auc_last_with_left_out"] - expected) < 1e-4, (res["auc_last_with_left_out"], expected)
    assert res["left_out_clean"] == 5 and res["left_out_corrupted"] == 25
    assert res["auc_last_with_left_out"] > 0.85 and abs(res["auc_last"] - 0.5) < 0.2
    assert "left out: 5 clean, 25 corrupted" in p.stdout
    assert res["auc_prior_all"] == pytest.approx(1 - 5 / 30, abs=1e-4)  # 5 of 30 corrupted above every clean pair
    assert res["auc_prior_last"] == pytest.approx(0.0, abs=1e-4)  # the survivors' corrupted pairs: all of them
    assert "AUC of the source contrast the teacher read" in p.stdout
    torch.save({"extra_state": {}}, tmp_path / "plain.pt")  # a run without --drop-below: nothing added
    sh([sys.executable, SCRIPTS / "analyze_weights.py", "--weights", tmp_path / "w.tsv", "--flags",
        tmp_path / "train.flags", "--checkpoint", tmp_path / "plain.pt", "--no-plots", "--out-dir", tmp_path])
    res = json.loads((tmp_path / "weights_analysis.json").read_text())
    assert "auc_last_with_left_out" not in res and "auc_prior_all" not in res


def test_analyze_weights_reports_clean_weight_by_target_length(tmp_path):
    """With the data-bin next to the flags file: the clean sentences by target-length quantile, how many the last
    part saw (the longest fifth left out here) and their mean weight (falling with length here)."""
    import torch
    from fairseq.data import indexed_dataset

    rng = np.random.default_rng(1)
    n = 200
    lengths = rng.integers(3, 40, n)
    for lang, lens in (("de", lengths + 1), ("en", lengths)):  # the source side has other lengths
        stem = str(tmp_path / f"train.de-en.{lang}")
        b = indexed_dataset.MMapIndexedDatasetBuilder(stem + ".bin", dtype=np.int32)
        for k in lens:
            b.add_item(torch.ones(int(k), dtype=torch.int32))
        b.finalize(stem + ".idx")
    flags = np.zeros(n, dtype=int)
    flags[:20] = 1
    (tmp_path / "train.flags").write_text("".join(f"{f}\n" for f in flags))
    longest = lengths >= np.quantile(lengths[flags == 0], 0.8)
    rows = ["update\tid\tweight\tloss"] + [
        f"{u}\t{i}\t{2.0 - lengths[i] / 40:.4f}\t1.0" for u in range(10) for i in range(n) if not longest[i]]
    (tmp_path / "w.tsv").write_text("\n".join(rows) + "\n")
    p = sh([sys.executable, SCRIPTS / "analyze_weights.py", "--weights", tmp_path / "w.tsv", "--flags",
            tmp_path / "train.flags", "--out-dir", tmp_path, "--no-plots"])
    by = json.loads((tmp_path / "weights_analysis.json").read_text())["clean_weight_by_target_length"]
    assert sum(b["corpus"] for b in by) == 180 and len(by) == 5
    assert by[-1]["seen"] == 0 and by[-1]["mean_w"] is None and all(b["seen"] == b["corpus"] for b in by[:-2])
    means = [b["mean_w"] for b in by[:-1]]
    assert means == sorted(means, reverse=True) and means[0] - means[-1] > 0.3
    assert "clean sentences by target length" in p.stdout


# ---------------------------------------------------------------------------------------------- eval post-processing
def test_score_generate_output(tmp_path):
    import sentencepiece as spm

    h = helpers()
    rng = random.Random(2)
    refs = [" ".join(f"Word{rng.randrange(30)}" for _ in range(rng.randint(3, 9))) + "." for _ in range(40)]
    (tmp_path / "text").write_text("\n".join(refs) + "\n")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "text"), model_prefix=str(tmp_path / "spm"), vocab_size=50,
                                   hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    order = list(range(40))
    rng.shuffle(order)  # fairseq-generate prints in batch (length) order
    gen = []
    for i in order:
        pieces = " ".join(sp.encode(refs[i], out_type=str))
        gen += [f"S-{i}\t{pieces}", f"T-{i}\t{pieces}", f"H-{i}\t-0.5\t{pieces}", f"D-{i}\t-0.5\t{refs[i]}",
                f"P-{i}\t-0.1 -0.2", f"H-{i}\t-0.9\tsecond best"]
    gen.append("2024-01-01 00:00:00 | INFO | fairseq_cli.generate | Translated 40 sentences")
    (tmp_path / "gen.txt").write_text("\n".join(gen) + "\n")
    (tmp_path / "ref.txt").write_text("\n".join(refs) + "\n")
    assert h.order_hypotheses(h.parse_generate(gen), 40) == [" ".join(sp.encode(r, out_type=str)) for r in refs]

    p = sh([sys.executable, SCRIPTS / "mt_helpers.py", "score", "--gen", tmp_path / "gen.txt", "--ref",
            tmp_path / "ref.txt", "--spm", tmp_path / "spm.model", "--hyp-out", tmp_path / "hyp.txt", "--json",
            tmp_path / "s.json"])
    res = json.loads((tmp_path / "s.json").read_text())
    assert res["bleu"] == 100.0 and res["chrf"] == 100.0 and res["bleu_signature"].startswith("nrefs:1|case:mixed")
    assert (tmp_path / "hyp.txt").read_text().splitlines() == refs
    assert "BLEU = 100.00" in p.stdout

    # one hypothesis wrong -> below 100; a missing one -> clear error
    bad = [x if not x.startswith("H-3\t-0.5") else "H-3\t-0.5\t▁nonsense" for x in gen]
    (tmp_path / "gen2.txt").write_text("\n".join(bad) + "\n")
    sh([sys.executable, SCRIPTS / "mt_helpers.py", "score", "--gen", tmp_path / "gen2.txt", "--ref",
        tmp_path / "ref.txt", "--spm", tmp_path / "spm.model", "--json", tmp_path / "s2.json"])
    assert json.loads((tmp_path / "s2.json").read_text())["bleu"] < 100
    (tmp_path / "gen3.txt").write_text("\n".join(x for x in gen if not x.startswith("H-5\t")) + "\n")
    p = sh([sys.executable, SCRIPTS / "mt_helpers.py", "score", "--gen", tmp_path / "gen3.txt", "--ref",
            tmp_path / "ref.txt"], check=False)
    assert p.returncode == 2 and "no hypothesis for 1 of 40" in p.stderr


# ---------------------------------------------------------------------------------------------- benchmark
def test_benchmark_report_and_dry_run(tmp_path):
    runs = tmp_path / "runs"
    bleu = {("clean", "none"): [30.0, 31.0], ("clean", "deep"): [30.5, 31.5], ("noisy", "none"): [20.0, 22.0],
            ("noisy", "deep"): [25.0, None]}
    for (c, m), vals in bleu.items():
        for s, v in zip((1, 2), vals):
            d = runs / c / m / f"seed{s}"
            d.mkdir(parents=True)
            log = [f"2024-01-01 00:00:{10 + k * (4 if m == 'deep' else 2):02d} | INFO | train_inner | epoch 001:"
                   f"  {k * 5} / 99 loss=1, num_updates={k * 5}, lr=0.001" for k in range(1, 6)]
            (d / "train.log").write_text("\n".join(log) + "\n")
            if v is None:
                continue
            (d / "bleu_test.json").write_text(json.dumps({"bleu": v, "chrf": 50.0, "bleu_signature": "SIG",
                                                          "chrf_signature": "CSIG"}))
            if c == "noisy":
                (d / "weights_analysis.json").write_text(json.dumps({
                    "auc_last": 0.9 if m == "deep" else 0.5, "auc_last_sentence_mean": 0.95, "auc_last_neg_loss": 0.7,
                    "mean_w_clean_last": 1.1, "mean_w_corrupted_last": 0.6,
                    **({"auc_last_with_left_out": 0.97} if m == "deep" else {}),
                    "curve": [{"update_from": 0, "update_to": 9, "auc": 0.6}]}))
    res = tmp_path / "res"
    sh([sys.executable, SCRIPTS / "benchmark_report.py", "--runs-dir", runs, "--results-dir", res,
        "--methods", "none deep", "--seeds", "1 2"])
    md = (res / "RESULTS.md").read_text()
    assert "| none | 30.50 ± 0.71 (30.00, 31.00) | 21.00 ± 1.41 (20.00, 22.00) |" in md
    assert "| deep | 31.00 ± 0.71 (30.50, 31.50) | 25.00 [1 missing] |" in md
    assert "sacrebleu signature: `SIG`" in md and "noisy/deep/seed2" in md
    assert "| deep | 0.900 [1 missing] |" in md and "| none | 0.500 ± 0.000 (0.500, 0.500) |" in md
    assert "| none | 0.400 | 1.00× | 0.400 | 1.00× |" in md and "| deep | 0.800 | 2.00× | 0.800 | 2.00× |" in md
    assert (res / "weights_auc_all.png").exists()
    # with the perfect-weight reference: the share of its gap each method recovers, and results.json
    for s, v in ((1, 28.0), (2, 30.0)):
        d = runs / "noisy" / "perfect" / f"seed{s}"
        d.mkdir(parents=True)
        (d / "bleu_test.json").write_text(json.dumps({"bleu": v, "chrf": 55.0, "bleu_signature": "SIG",
                                                      "chrf_signature": "CSIG"}))
    sh([sys.executable, SCRIPTS / "benchmark_report.py", "--runs-dir", runs, "--results-dir", res,
        "--methods", "none deep perfect", "--seeds", "1 2"])
    md = (res / "RESULTS.md").read_text()
    assert "| perfect | – | 29.00 ± 1.41 (28.00, 30.00) |" in md
    assert "Share of the gap to perfect weights (8.00 BLEU, misaligned 30%) recovered, mean over seeds: `deep` +50 %" in md
    rows = json.loads((res / "results.json").read_text())

    def has(rows, row):  # a row with these fields (and maybe more)
        return any(all(r.get(k) == v for k, v in row.items()) for r in rows)

    assert has(rows, {"method": "deep", "condition": "misaligned0.3", "seed": 1, "bleu": 25.0, "chrf": 50.0, "auc": 0.9,
                      "w_clean": 1.1, "w_corrupted": 0.6, "auc_sentence_mean": 0.95, "auc_neg_loss": 0.7,
                      "auc_with_left_out": 0.97, "s_per_update": 0.8})
    assert has(rows, {"method": "none", "condition": "clean", "seed": 2, "bleu": 31.0, "chrf": 50.0, "auc": None})
    assert has(rows, {"method": "perfect", "condition": "misaligned0.3", "seed": 1, "bleu": 28.0, "chrf": 55.0,
                      "auc": None})
    assert len(rows) == 9  # 11 runs, noisy/deep/seed2 unfinished, none of perfect on clean
    # a filter run reports its score's AUC; --carry fills runs no longer on disk from an earlier results.json
    d = runs / "noisy" / "filter-loss" / "seed1"
    d.mkdir(parents=True)
    (d / "bleu_test.json").write_text(json.dumps({"bleu": 27.0, "chrf": 52.0, "bleu_signature": "SIG",
                                                  "chrf_signature": "CSIG"}))
    (d / "filter_analysis.json").write_text(json.dumps({"auc": 0.71}))
    old = tmp_path / "old.json"
    old.write_text(json.dumps([{"method": "deep", "condition": "misaligned0.3", "seed": 2, "bleu": 27.0, "chrf": 49.0,
                                "auc": 0.8, "w_clean": 1.3, "w_corrupted": 0.2, "auc_sentence_mean": 0.85,
                                "auc_neg_loss": 0.65, "auc_with_left_out": 0.95, "s_per_update": 0.6},
                               {"method": "filter-loss", "condition": "misaligned0.3", "seed": 2,
                                "bleu": 26.0, "chrf": 51.0, "auc": 0.69},
                               {"method": "deep", "condition": "misaligned0.3", "seed": 1, "bleu": 1.0, "auc": 0.1},
                               {"method": "mwnet", "condition": "misaligned0.3", "seed": 1, "bleu": 23.0, "auc": 0.7}]))
    sh([sys.executable, SCRIPTS / "benchmark_report.py", "--runs-dir", runs, "--results-dir", res,
        "--methods", "filter-loss deep none perfect", "--seeds", "2 1", "--conditions", "noisy", "--carry", old])
    md = (res / "RESULTS.md").read_text()
    assert "| deep | 26.00 ± 1.41 (27.00, 25.00) |" in md  # seed 1 from disk, not from the file
    assert "| filter-loss (its score, whole train split) | 0.700 ± 0.014 (0.690, 0.710) |" in md
    assert "Carried over from" in md and "noisy/deep/seed2, noisy/filter-loss/seed2" in md
    assert "sacrebleu signature: `SIG`" in md
    # every column of a carried run: the weight analysis' figures and its seconds per update
    assert "| deep | 0.850 ± 0.071 (0.800, 0.900) | 0.900 ± 0.071 (0.850, 0.950) | 0.960 ± 0.014 (0.950, 0.970) | " \
           "1.200 / 0.400 | 0.675 ± 0.035 (0.650, 0.700) |" in md
    assert "| deep | 0.700 | 1.75× |" in md
    rows = json.loads((res / "results.json").read_text())
    assert has(rows, {"method": "filter-loss", "condition": "misaligned0.3", "seed": 1, "bleu": 27.0, "chrf": 52.0,
                      "auc": 0.71})
    assert has(rows, {"method": "deep", "condition": "misaligned0.3", "seed": 2, "bleu": 27.0, "chrf": 49.0, "auc": 0.8,
                      "w_clean": 1.3, "s_per_update": 0.6})
    assert has(rows, {"method": "mwnet", "seed": 1, "bleu": 23.0})  # outside this table: kept, not lost
    assert not has(rows, {"method": "deep", "seed": 1, "bleu": 1.0})  # the run on disk wins
    # a filter's cost before its retraining: the scoring, and for dual-xent the backward model's training
    (d / "score_time.json").write_text(json.dumps({"score_seconds": 300}))
    dx, bdir = runs / "noisy" / "filter-dual-xent" / "seed1", runs / "noisy" / "backward400" / "seed1"
    for x in (dx, bdir, runs / "noisy" / "backward1060" / "seed1"):
        x.mkdir(parents=True)
    (dx / "bleu_test.json").write_text((d / "bleu_test.json").read_text())
    (dx / "score_time.json").write_text(json.dumps({"score_seconds": 120, "backward_dir": str(bdir)}))
    (bdir / "train_time.json").write_text(json.dumps({"wall_seconds": 600}))
    shutil.copytree(dx, runs / "noisy" / "filter-dual-xent-full" / "seed1")  # a named variant's folder
    fres = tmp_path / "res_filter"
    sh([sys.executable, SCRIPTS / "benchmark_report.py", "--runs-dir", runs, "--results-dir", fres,
        "--methods", "none filter-loss filter-dual-xent filter-dual-xent-full", "--seeds", "1", "--conditions",
        "clean noisy"])
    rows = json.loads((fres / "results.json").read_text())
    assert has(rows, {"method": "filter-loss", "seed": 1, "filter_seconds": 300})
    assert has(rows, {"method": "filter-dual-xent", "seed": 1, "filter_seconds": 720})
    assert has(rows, {"method": "filter-dual-xent-full", "seed": 1, "filter_seconds": 720})
    md = (fres / "RESULTS.md").read_text()
    assert "clean/filter-" not in md  # filters are runs of the noisy condition only, never missing on clean
    assert re.search(r"\| filter-loss \|[^\n]*\| 5\.0 \|\n", md) and re.search(r"\| filter-dual-xent \|[^\n]*\| 12\.0 \|\n", md)

    # a fresh machine: the runner's --report-only --carry rebuilds the table from the recorded results alone
    sh([SCRIPTS / "run_multi30k_benchmark.sh", "--report-only", "--carry", "--runs-dir", tmp_path / "fresh",
        "--results-dir", res, "--methods", "none deep", "--conditions", "noisy"])
    md = (res / "RESULTS.md").read_text()
    assert "| deep | 26.00 ± 1.41 (25.00, 27.00) |" in md and "Carried over from" in md
    assert has(json.loads((res / "results.json").read_text()), {"method": "mwnet", "seed": 1, "bleu": 23.0})
    p = subprocess.run([SCRIPTS / "run_multi30k_benchmark.sh", "--report-only", "--carry", "--runs-dir",
                        tmp_path / "fresh", "--results-dir", tmp_path / "empty"], capture_output=True, text=True)
    assert p.returncode == 2 and "--carry: no" in p.stderr and "results.json to carry" in p.stderr

    p = sh([SCRIPTS / "run_multi30k_benchmark.sh", "--dry-run", "--runs-dir", runs, "--seeds", "1 2 3"])
    lines = [x for x in p.stdout.splitlines() if x.startswith(("todo", "done"))]
    # 2 conditions x 4 methods + perfect weights (noisy only), x 3 seeds
    assert len(lines) == 27 and all(x.startswith("todo") for x in lines)
    assert sum(" perfect " in x for x in lines) == 3 and not any("clean perfect" in x for x in lines)


def test_bench_speed_runs_and_reports_whole_cycles(noisy_bin, tmp_path):
    """bench_speed.py end to end on a tiny data-bin (no timing is asserted): one row per configuration,
    the first is the baseline, and every timed round covers whole --meta-refresh cycles."""
    data, _ = noisy_bin
    out = tmp_path / "bench"
    p = sh([sys.executable, SCRIPTS / "bench_speed.py", "nmt", "--data", data, "--rounds", "3", "--updates-per-round",
            "2", "--config", "plain=plain", "--config", "deep refresh 2=--reweight-method deep --meta-refresh 2 "
            "--meta-ema 0.5", "--out", out])
    res = json.loads(out.with_suffix(".json").read_text())
    assert [r["config"] for r in res["rows"]] == ["plain", "deep refresh 2"]
    assert res["rows"][0]["ratio"] == 1.0 and all(r["updates_timed"] == 4 and r["sec_per_update"] > 0
                                                  for r in res["rows"])
    assert "| deep refresh 2 |" in p.stdout and "round's mean" in out.with_suffix(".md").read_text()


def test_subset_keeps_the_clean_pairs_with_the_same_dictionaries(noisy_bin, tmp_path):
    """mt_helpers.py subset --keep-clean (the perfect-weight reference): the train split holds exactly the pairs
    train.flags marks clean, in order, binarized with the noisy data-bin's dictionaries; the other splits are
    the same files; a keep list of the wrong length is refused."""
    data, _ = noisy_bin
    out = tmp_path / "clean_pairs"
    sh([sys.executable, SCRIPTS / "mt_helpers.py", "subset", "--data", data, "--keep-clean", "--out", out])
    flags = [int(x) for x in (data / "train.flags").read_text().split()]
    ids = [int(x) for x in (out / "train.orig_ids").read_text().split()]
    assert ids == [i for i, f in enumerate(flags) if f == 0] and 0 < len(ids) < len(flags)
    assert (out / "dict.de.txt").read_text() == (data / "dict.de.txt").read_text()
    assert (out / "test.de-en.de.bin").resolve() == (data / "test.de-en.de.bin").resolve()
    import torch
    from fairseq.data import data_utils
    from fairseq.data.dictionary import Dictionary

    d = Dictionary.load(str(data / "dict.en.txt"))
    old = data_utils.load_indexed_dataset(str(data / "train.de-en.en"), d)
    new = data_utils.load_indexed_dataset(str(out / "train.de-en.en"), d)
    assert len(new) == len(ids) and all(torch.equal(new[j], old[i]) for j, i in enumerate(ids))
    bad = tmp_path / "keep.txt"
    bad.write_text("1\n0\n")
    p = sh([sys.executable, SCRIPTS / "mt_helpers.py", "subset", "--data", data, "--keep", bad, "--out",
            tmp_path / "bad"], check=False)
    assert p.returncode == 2 and "one 0/1 per train sentence id" in p.stderr
