"""Bad input: each case is a clear error that names the problem and the fix, through the real command
line (fairseq-train, python -m fairseq_reweight.noise, scripts/analyze_weights.py,
python -m fairseq_reweight.image), and a failed run loses nothing: the files already in its save dir
(checkpoint_last.pt, ...) or output folder are left byte for byte as they were.

Also covered elsewhere: tests/test_cli.py::test_clear_errors (same NMT errors on a fresh save dir),
tests/test_image.py::test_fashion_mnist_errors_name_the_fix / test_cifar_errors / test_cli_flag_errors /
test_noise_rate_outside_unit_interval (in-process), tests/test_scripts.py::test_analyze_weights_synthetic.
"""

import gzip
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import BIN, ROOT, make_corpus, run, train_cmd


# ---------------------------------------------------------------------- helpers
def snapshot(folder: Path):
    """Every file under ``folder``: its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_nothing_lost(before, folder: Path):
    after = snapshot(folder)
    for name, (data, mtime) in before.items():
        assert name in after, f"the failed run removed {name}"
        assert after[name][0] == data, f"the failed run changed {name}"
        assert after[name][1] == mtime, f"the failed run rewrote {name}"


def fails(cmd, *needles, cwd=None):
    """Run ``cmd``; it must exit non-zero and print every one of ``needles``. Returns the output."""
    p = subprocess.run([str(c) for c in cmd], cwd=cwd or ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
    assert p.returncode != 0, f"{cmd} succeeded:\n{p.stdout[-3000:]}"
    for needle in needles:
        assert needle in p.stdout, f"{needle!r} not in the output:\n{p.stdout[-3000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A save dir after a 2-update deep run (checkpoint_last.pt, checkpoint_best.pt)."""
    save = tmp_path_factory.mktemp("trained") / "ck"
    run(train_cmd(tiny_data, save, "deep", max_update=2))
    assert (save / "checkpoint_last.pt").is_file()
    return save


@pytest.fixture
def resume(trained, tmp_path):
    """A copy of ``trained`` (same bytes and mtimes) to resume into, and its snapshot."""
    save = tmp_path / "ck"
    shutil.copytree(trained, save)
    return save, snapshot(save)


def data_copy(tiny_data, tmp_path) -> Path:
    dest = tmp_path / "bin"
    shutil.copytree(tiny_data, dest)
    return dest


def write_split(dest: Path, split: str, src_lines, tgt_lines):
    """Binarize text into ``dest/split.src-tgt.*`` with dest's dictionaries, as fairseq-preprocess
    --srcdict/--tgtdict does (in-process: the same files, without the start-up time)."""
    from fairseq.data import Dictionary, indexed_dataset

    for lang, lines in (("src", src_lines), ("tgt", tgt_lines)):
        d = Dictionary.load(str(dest / f"dict.{lang}.txt"))
        prefix = dest / f"{split}.src-tgt.{lang}"
        builder = indexed_dataset.make_builder(f"{prefix}.bin", "mmap", vocab_size=len(d))
        for line in lines:
            builder.add_item(d.encode_line(line, add_if_not_exist=False, append_eos=True))
        builder.finalize(f"{prefix}.idx")


def resume_cmd(data, save, *extra, method="deep"):
    """Continue ``save`` (2 updates done) for 2 more updates: what would overwrite checkpoint_last.pt."""
    return train_cmd(data, save, method, max_update=4, extra=list(extra))


# ---------------------------------------------------------------------- the meta split
def test_missing_meta_subset(tiny_data, resume):
    save, before = resume
    fails(resume_cmd(tiny_data, save, "--meta-subset", "nosuch"),
          "needs a clean meta split 'nosuch'", f"--srcdict {tiny_data}/dict.src.txt", "--testpref PREFIX",
          f"rename TMP/test.* to {tiny_data}/nosuch.*", "or point --meta-subset at an existing split")
    assert_nothing_lost(before, save)


def test_meta_split_binarized_with_another_dictionary(tiny_data, resume, tmp_path):
    """The usual mistake: `fairseq-preprocess --trainpref META` builds the meta split's own dictionary."""
    save, before = resume
    data = data_copy(tiny_data, tmp_path)
    raw = tmp_path / "raw"
    make_corpus(raw, n_train=1, n_valid=1, n_meta=60, vocab=60, seed=5)  # a meta set with a larger vocabulary
    run([BIN / "fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--trainpref", raw / "meta",
         "--destdir", tmp_path / "own", "--workers", "1"])
    for f in (tmp_path / "own").glob("train.*"):
        shutil.copy(f, data / f.name.replace("train.", "meta.", 1))
    fails(resume_cmd(data, save), "meta split 'meta' in", "so it was binarized with a different dictionary",
          "Re-binarize the meta split with --srcdict/--tgtdict of the training data-bin",
          f"--srcdict {data}/dict.src.txt --tgtdict {data}/dict.tgt.txt")
    assert_nothing_lost(before, save)


def test_meta_split_mostly_unknown_words(tiny_data, resume, tmp_path):
    """Meta text not tokenized like the training text (here: other words) binarizes to mostly <unk>."""
    save, before = resume
    data = data_copy(tiny_data, tmp_path)
    src = [f"c{i % 24} c{(i * 7) % 24} a1" for i in range(60)]  # 2 of 3 words unknown
    write_split(data, "meta", src, [s.replace("a", "b") for s in src])
    fails(resume_cmd(data, save), "67% of its source tokens are <unk> under dict.src.txt of the training data",
          "not tokenized like the training data",
          "Re-binarize the meta split with --srcdict/--tgtdict of the training data-bin")
    assert_nothing_lost(before, save)


def test_empty_meta_split(tiny_data, resume, tmp_path):
    save, before = resume
    data = data_copy(tiny_data, tmp_path)
    write_split(data, "meta", [], [])
    fails(resume_cmd(data, save), "meta split 'meta' in", "is empty (0 sentence pairs)",
          "--reweight-method deep needs clean sentence pairs there", "Re-binarize it from non-empty text",
          "or point --meta-subset at another split")
    assert_nothing_lost(before, save)


# ---------------------------------------------------------------------- the training split
def test_empty_training_split(tiny_data, resume, tmp_path):
    save, before = resume
    data = data_copy(tiny_data, tmp_path)
    write_split(data, "train", [], [])
    fails(resume_cmd(data, save), "split 'train' in", "is empty (0 sentence pairs)",
          "Re-run fairseq-preprocess on complete, non-empty text", f"--srcdict {data}/dict.src.txt")
    assert_nothing_lost(before, save)


@pytest.mark.parametrize("cut,message", [
    ("src.bin", "is truncated: "),  # fairseq would only fail at the first batch that reads past the end
    ("tgt.idx", "cannot be read (ValueError: "),
], ids=["bin", "idx"])
def test_truncated_training_split(tiny_data, resume, tmp_path, cut, message):
    save, before = resume
    data = data_copy(tiny_data, tmp_path)
    f = data / f"train.src-tgt.{cut}"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    fails(resume_cmd(data, save), "split 'train' in", message, "Re-run fairseq-preprocess",
          "or copy the data-bin again if it was cut short")
    assert_nothing_lost(before, save)


# ---------------------------------------------------------------------- flags and models
def test_unknown_reweight_method(tiny_data, resume):
    save, before = resume
    fails(resume_cmd(tiny_data, save, method="bogus"), "argument --reweight-method: invalid choice: 'bogus'",
          "choose from 'none', 'l2rw', 'mwnet', 'deep'")
    assert_nothing_lost(before, save)


def test_teacher_states_names_a_missing_layer(tiny_data, resume):
    save, before = resume
    fails(resume_cmd(tiny_data, save, "--teacher-states", "1,5"), "--teacher-states '1,5'",
          "this student exposes decoder layers 1..2, not [5]")
    assert_nothing_lost(before, save)


@pytest.mark.parametrize("method,extra,message", [
    ("l2rw", ["--teacher-lr", "0.01"], "--teacher-lr has no effect with --reweight-method l2rw (no teacher): "
                                       "drop it, or use --reweight-method mwnet/deep"),
    ("mwnet", ["--teacher-states", "all"], "--teacher-states only applies to --reweight-method deep"),
], ids=["l2rw-teacher-lr", "mwnet-teacher-states"])
def test_incompatible_flags(tiny_data, resume, method, extra, message):
    save, before = resume
    fails(resume_cmd(tiny_data, save, *extra, method=method), message)
    assert_nothing_lost(before, save)


def test_arch_whose_decoder_has_no_extract_features(tiny_data, tmp_path):
    cmd = train_cmd(tiny_data, tmp_path / "ck", "deep", max_update=2)
    i = cmd.index("--arch")
    cmd = cmd[:i] + ["--arch", "fconv", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
                     "--decoder-out-embed-dim", "32", "--encoder-layers", "[(32, 3)] * 2",
                     "--decoder-layers", "[(32, 3)] * 2"]
    out = fails(cmd, "the decoder of FConvModel (FConvDecoder) does not implement extract_features",
          "Use an --arch whose decoder does", "--arch transformer")
    assert "begin training epoch" not in out, "the error should fire when the model is built"
    assert not (tmp_path / "ck" / "checkpoint_last.pt").exists()


# ---------------------------------------------------------------------- NMT noise CLI
@pytest.mark.parametrize("rate", ["1.0", "-0.1"])
def test_nmt_noise_rate_outside_unit_interval(tmp_path, rate):
    (tmp_path / "in.src").write_text("a b\nc d\n")
    (tmp_path / "in.tgt").write_text("x y\nz w\n")
    outs = {"--out-src": tmp_path / "o.src", "--out-tgt": tmp_path / "o.tgt", "--flags": tmp_path / "o.flags"}
    for path in outs.values():
        path.write_text("earlier output\n")
    before = snapshot(tmp_path)
    args = ["--src", tmp_path / "in.src", "--tgt", tmp_path / "in.tgt", "--type", "misaligned", "--rate", rate]
    for flag, path in outs.items():
        args += [flag, path]
    fails([sys.executable, "-m", "fairseq_reweight.noise", *args], f"--rate must be in [0, 1), got {float(rate)}",
          "e.g. --rate 0.3")
    assert_nothing_lost(before, tmp_path)


# ---------------------------------------------------------------------- weight analysis
@pytest.fixture
def dump(tmp_path):
    """A --dump-weights file for sentences 0..9 and an earlier analysis in its folder."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = ["update\tid\tweight\tloss"]
    rows += [f"{u}\t{i}\t{1 + 0.1 * (i % 2):.2f}\t3.0" for u in range(3) for i in range(10)]
    (run_dir / "w.tsv").write_text("\n".join(rows) + "\n")
    (run_dir / "weights_analysis.json").write_text("{}\n")
    return run_dir / "w.tsv"


def analyze(weights, flags):
    return [sys.executable, ROOT / "scripts" / "analyze_weights.py", "--weights", weights, "--flags", flags,
            "--no-plots"]


@pytest.mark.parametrize("content,message", [
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "cannot read flags file"),  # binary: not UTF-8 text
    (b"update\tid\tweight\tloss\n0\t1\t1.0\t2.0\n", ":1: expected 0 or 1, got 'update\\tid\\tweight\\tloss\\n': "
                                                   "not a flags file"),  # the dump passed as flags
    (b"", "is empty"),
], ids=["binary", "not-flags", "empty"])
def test_unreadable_flags_file(dump, tmp_path, content, message):
    flags = tmp_path / "train.flags"
    flags.write_bytes(content)
    before = snapshot(dump.parent)
    fails(analyze(dump, flags), message, "pass the flags file written with the training data",
          "DATA-BIN/train.flags from scripts/prepare_multi30k.sh")
    assert_nothing_lost(before, dump.parent)


def test_flags_file_of_another_corpus(tiny_data, dump, tmp_path):
    # fewer lines than the sentence ids in the dump
    short = tmp_path / "short.flags"
    short.write_text("0\n1\n0\n")
    before = snapshot(dump.parent)
    fails(analyze(dump, short), "sentence id 9 in the dump but the flags file has only 3 lines",
          "pass the flags file written with the training data")
    # more lines than the train split it sits next to (DATA-BIN/train.flags): caught from the .idx header
    data = data_copy(tiny_data, tmp_path)
    (data / "train.flags").write_text("0\n" * 301)
    fails(analyze(dump, data / "train.flags"), "has 301 lines but the train split next to it",
          "has 300 sentences: the flags do not belong to this data-bin",
          "pass the flags file written with the training data")
    assert_nothing_lost(before, dump.parent)


# ---------------------------------------------------------------------- image data and noise
def _write_idx(path: Path, arr: np.ndarray):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


@pytest.fixture
def image_dirs(tmp_path):
    """A valid tiny Fashion-MNIST directory, and a save dir with an earlier run's files."""
    fashion = tmp_path / "fashion"
    fashion.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("t10k", 20)):
        _write_idx(fashion / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, size=(n, 8, 8)))
        _write_idx(fashion / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    save = tmp_path / "save"
    save.mkdir()
    (save / "checkpoint_last.pt").write_bytes(b"an earlier run")
    (save / "log.json").write_text("{}\n")
    return fashion, save


def image_cmd(data_dir, save, *extra, dataset="fashion-mnist"):
    return [sys.executable, "-m", "fairseq_reweight.image", "--dataset", dataset, "--data-dir", data_dir,
            "--arch", "resnet8", "--train-size", "100", "--meta-size", "50", "--batch-size", "20", "--epochs", "1",
            "--reweight-method", "mwnet", "--save-dir", save, "--no-progress", "--threads", "1", *extra]


def test_image_data_dir_missing(image_dirs, tmp_path):
    _, save = image_dirs
    before = snapshot(save)
    fails(image_cmd(tmp_path / "nowhere", save), f"fashion-mnist: {tmp_path / 'nowhere'} lacks",
          "apt-get install dataset-fashion-mnist", "point --data-dir / $FASHION_MNIST_DIR at a directory with")
    assert_nothing_lost(before, save)


@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10"])
def test_image_data_in_the_wrong_format(image_dirs, tmp_path, dataset):
    fashion, save = image_dirs
    bad = tmp_path / "bad"
    if dataset == "fashion-mnist":  # the right names, but not IDX files (e.g. an HTML error page saved)
        shutil.copytree(fashion, bad)
        (bad / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"<html>404 Not Found</html>"))
        needles = ["train-labels-idx1-ubyte.gz is not an unsigned-byte IDX file (bad magic number)",
                   "the files must be the original IDX files", "apt-get install dataset-fashion-mnist"]
    else:  # CIFAR's names, but the pickles hold something else
        bad.mkdir()
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            with open(bad / name, "wb") as f:
                pickle.dump({b"images": [1, 2, 3]}, f)
        needles = ["lacks the 'data'/'labels' entries of the CIFAR pickle format",
                   "point --data-dir / $CIFAR10_DIR at the extracted 'cifar-10-batches-py' directory"]
    before = snapshot(save)
    fails(image_cmd(bad, save, dataset=dataset), *needles)
    assert_nothing_lost(before, save)


@pytest.mark.parametrize("rate", ["1.0", "-0.1"])
def test_image_noise_rate_outside_unit_interval(image_dirs, rate):
    fashion, save = image_dirs
    before = snapshot(save)
    fails(image_cmd(fashion, save, "--noise-rate", rate), f"--noise-rate must be in [0, 1), got {float(rate)}",
          "e.g. --noise-rate 0.4")
    assert_nothing_lost(before, save)
