#!/usr/bin/env python
"""Python side of the data-preparation and evaluation scripts (imports neither torch nor fairseq).

Subcommands (each has ``--help``):

``build``
    raw parallel text (``RAW/{train,valid,test}.{SRC,TGT}``) -> clean meta hold-out -> optional noise
    -> joint sentencepiece model -> ``fairseq-preprocess`` data-bin with train/valid/test/meta,
    ``train.flags`` and raw references. Used by ``prepare_multi30k.sh`` and ``prepare_iwslt14.sh``.
``iwslt-text``
    the text part of the IWSLT'14 recipe: strip the TED xml/tags, clean, split valid/test.
``subset``
    a data-bin's train split filtered by a keep list (one 0/1 per train sentence id) -> a new data-bin
    with the same dictionaries, valid/test/meta splits and references: the perfect-weight reference
    (``--keep-clean``: the pairs ``train.flags`` marks clean) and filter-and-retrain baselines.
``score``
    fairseq-generate output -> hypotheses in the original order -> sentencepiece decoding ->
    sacrebleu BLEU and chrF (with signatures) against the raw references. Used by ``eval_bleu.sh``.
"""

import argparse
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
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str, tag: str = "prepare") -> None:
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


def die(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def noise_module():
    """``fairseq_reweight/noise.py`` without importing the package (whose __init__ imports fairseq)."""
    spec = importlib.util.spec_from_file_location("_fr_noise", ROOT / "fairseq_reweight" / "noise.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_lines(path) -> List[str]:
    path = str(path)
    if not os.path.exists(path):
        die(f"missing input file: {path}")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n").rstrip("\r") for line in f]


def write_lines(path, lines: Sequence[str]) -> None:
    """Atomic: a half-written file is never left under the final name (steps are skipped when it exists)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(f"{line}\n" for line in lines))
    os.replace(tmp, path)


def exists(*paths) -> bool:
    return all(Path(p).exists() for p in paths)


# ====================================================================== build
def _run(cmd: List[str], logfile: Path) -> None:
    with open(logfile, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        p = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        tail = Path(logfile).read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        die(f"{cmd[0]} failed (exit {p.returncode}); see {logfile}:\n" + "\n".join(tail))


def _fairseq_preprocess() -> str:
    exe = Path(sys.executable).parent / "fairseq-preprocess"
    if exe.exists():
        return str(exe)
    found = shutil.which("fairseq-preprocess")
    if not found:
        die("fairseq-preprocess not found: activate the environment where fairseq is installed")
    return found


def build(args) -> int:
    src, tgt = args.src, args.tgt
    raw, out = Path(args.raw_dir), Path(args.out)
    text = out / "text"
    for split in ("train", "valid", "test"):
        for lang in (src, tgt):
            if not (raw / f"{split}.{lang}").exists():
                die(f"missing raw text {raw / f'{split}.{lang}'} (expected RAW/{{train,valid,test}}.{{{src},{tgt}}})")
    if args.noise != "none" and not 0 < args.noise_rate <= 1:
        die(f"--noise-rate must be in (0, 1] with --noise {args.noise}, got {args.noise_rate}")
    out.mkdir(parents=True, exist_ok=True)
    text.mkdir(exist_ok=True)

    options = {k: getattr(args, k) for k in ("src", "tgt", "vocab", "meta_size", "seed", "noise", "noise_rate",
                                             "noise_on", "token_rate", "token_side", "spm_model_type",
                                             "character_coverage", "bleu_tokenize")}
    options["spm_model"] = str(Path(args.spm_model).resolve()) if args.spm_model else None
    stamp = out / "prepare_options.json"
    if stamp.exists():
        old = json.loads(stamp.read_text())
        if old != options:
            diff = {k: (old.get(k), v) for k, v in options.items() if old.get(k) != v}
            die(f"{out} was prepared with other options {diff} (old, new): use another --out or delete it")
    else:
        stamp.write_text(json.dumps(options, indent=1) + "\n")

    # 1. clean meta hold-out (before any noise)
    if exists(text / f"train.clean.{src}", text / f"train.clean.{tgt}", text / f"meta.{src}", text / f"meta.{tgt}",
              text / "train.orig_ids", text / "meta.orig_ids"):
        log("meta hold-out: exists, skipped")
    else:
        s, t = read_lines(raw / f"train.{src}"), read_lines(raw / f"train.{tgt}")
        if len(s) != len(t):
            die(f"raw train sides differ in length: {len(s)} {src} vs {len(t)} {tgt} lines")
        if not 0 <= args.meta_size < len(s):
            die(f"--meta-size {args.meta_size} must be in [0, {len(s)}) (train has {len(s)} pairs)")
        meta = set(random.Random(f"meta-{args.seed}").sample(range(len(s)), args.meta_size))
        keep = [i for i in range(len(s)) if i not in meta]
        held = sorted(meta)
        write_lines(text / f"meta.{src}", [s[i] for i in held])
        write_lines(text / f"meta.{tgt}", [t[i] for i in held])
        write_lines(text / "meta.orig_ids", [str(i) for i in held])
        write_lines(text / f"train.clean.{src}", [s[i] for i in keep])
        write_lines(text / f"train.clean.{tgt}", [t[i] for i in keep])
        write_lines(text / "train.orig_ids", [str(i) for i in keep])
        log(f"meta hold-out: {len(held)} clean pairs -> meta, {len(keep)} -> train (seed {args.seed})")

    noise = noise_module()

    def inject(in_prefix: Path, out_prefix: Path) -> None:
        flags_file = out / "train.flags"
        outs = [Path(f"{out_prefix}.{src}"), Path(f"{out_prefix}.{tgt}"), flags_file]
        if exists(*outs):
            log(f"noise ({args.noise}): exists, skipped")
            return
        s, t = read_lines(f"{in_prefix}.{src}"), read_lines(f"{in_prefix}.{tgt}")
        if args.noise == "none":
            ns, nt, flags = s, t, [0] * len(s)
        else:
            ns, nt, flags = noise.corrupt(s, t, args.noise, args.noise_rate, args.seed, args.token_rate,
                                          args.token_side)
        write_lines(outs[0], ns)
        write_lines(outs[1], nt)
        write_lines(flags_file, [str(f) for f in flags])
        log(f"noise ({args.noise}, on {args.noise_on} text): corrupted {sum(flags)}/{len(flags)} train pairs "
            f"-> {flags_file}")

    # 2. noise on raw text
    if args.noise_on == "raw":
        inject(text / "train.clean", text / "train")

    # 3. sentencepiece model (joint over the source and target training text that is binarized)
    spm_model = out / "spm.model"
    import sentencepiece as spm

    if spm_model.exists():
        log("sentencepiece model: exists, skipped")
    elif args.spm_model:
        if not Path(args.spm_model).exists():
            die(f"--spm-model {args.spm_model} not found")
        shutil.copy(args.spm_model, spm_model)
        vocab = Path(args.spm_model).with_suffix(".vocab")
        if vocab.exists():
            shutil.copy(vocab, out / "spm.vocab")
        log(f"sentencepiece model: copied {args.spm_model}")
    else:
        train_prefix = "train" if args.noise_on == "raw" else "train.clean"
        inputs = [str(text / f"{train_prefix}.{src}"), str(text / f"{train_prefix}.{tgt}")]
        log(f"sentencepiece: training a joint {args.spm_model_type} model, vocab {args.vocab}, on {inputs[0]} + "
            f"{inputs[1]}")
        if hasattr(spm, "set_random_generator_seed"):
            spm.set_random_generator_seed(args.seed)
        tmp_prefix = out / "spm_tmp"
        spm.SentencePieceTrainer.train(
            input=inputs, model_prefix=str(tmp_prefix), vocab_size=args.vocab, model_type=args.spm_model_type,
            character_coverage=args.character_coverage, hard_vocab_limit=False, input_sentence_size=2000000,
            shuffle_input_sentence=True, num_threads=max(1, args.workers), minloglevel=2,
        )
        os.replace(f"{tmp_prefix}.vocab", out / "spm.vocab")
        os.replace(f"{tmp_prefix}.model", spm_model)
        log(f"sentencepiece: wrote {spm_model}")
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))

    # 4. encode
    train_in = "train" if args.noise_on == "raw" else "train.clean"
    enc_sources = {"train": train_in, "valid": None, "test": None, "meta": "meta"}
    for split, name in enc_sources.items():
        for lang in (src, tgt):
            dest = text / f"spm.{'train.clean' if (split == 'train' and args.noise_on == 'spm') else split}.{lang}"
            if dest.exists():
                continue
            source = text / f"{name}.{lang}" if name else raw / f"{split}.{lang}"
            lines = read_lines(source)
            pieces = sp.encode(lines, out_type=str)
            write_lines(dest, [" ".join(p) for p in pieces])
            log(f"sentencepiece: encoded {source} ({len(lines)} lines) -> {dest}")

    # 2'. noise on sentencepiece text
    if args.noise_on == "spm":
        inject(text / "spm.train.clean", text / "spm.train")

    # 5. binarize: train/valid/test with a joined dictionary, then meta with the same dictionaries
    pre = _fairseq_preprocess()
    pair = f"{src}-{tgt}"
    logfile = out / "preprocess.log"
    main_files = [out / f"dict.{src}.txt", out / f"dict.{tgt}.txt"] + [
        out / f"{split}.{pair}.{lang}.{ext}" for split in ("train", "valid", "test") for lang in (src, tgt)
        for ext in ("bin", "idx")]
    if exists(*main_files):
        log("fairseq-preprocess train/valid/test: exists, skipped")
    else:
        tmp = out / "_bin_tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        log("fairseq-preprocess: train/valid/test (joined dictionary) ...")
        _run([pre, "--source-lang", src, "--target-lang", tgt, "--trainpref", text / "spm.train",
              "--validpref", text / "spm.valid", "--testpref", text / "spm.test", "--destdir", tmp,
              "--joined-dictionary", "--workers", str(args.workers)], logfile)
        for f in sorted(tmp.iterdir()):
            if f.name != "preprocess.log":
                os.replace(f, out / f.name)
        shutil.rmtree(tmp)
    meta_files = [out / f"meta.{pair}.{lang}.{ext}" for lang in (src, tgt) for ext in ("bin", "idx")]
    if exists(*meta_files):
        log("fairseq-preprocess meta: exists, skipped")
    else:
        tmp = out / "_meta_tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        log("fairseq-preprocess: meta (train dictionaries) ...")
        _run([pre, "--source-lang", src, "--target-lang", tgt, "--srcdict", out / f"dict.{src}.txt",
              "--tgtdict", out / f"dict.{tgt}.txt", "--testpref", text / "spm.meta", "--destdir", tmp,
              "--workers", str(args.workers)], logfile)
        for f in sorted(tmp.glob("test.*")):
            os.replace(f, out / f.name.replace("test.", "meta.", 1))
        shutil.rmtree(tmp)

    # 6. raw references for eval_bleu.sh
    for split in ("valid", "test"):
        for lang in (src, tgt):
            dest = out / "ref" / f"{split}.{lang}"
            if not dest.exists():
                write_lines(dest, read_lines(raw / f"{split}.{lang}"))

    counts = {split: len(read_lines(text / f"spm.{split}.{src}")) for split in ("train", "valid", "test", "meta")}
    flags = noise.read_flags(str(out / "train.flags"))
    if len(flags) != counts["train"]:
        die(f"{out / 'train.flags'} has {len(flags)} lines but train has {counts['train']} pairs: delete {out} and "
            "prepare again")
    info = dict(options, data_bin=str(out), sizes=counts, corrupted=sum(flags), flags=str(out / "train.flags"),
                spm=str(spm_model), refs={s: str(out / "ref" / f"{s}.{tgt}") for s in ("valid", "test")},
                bleu_tokenize=args.bleu_tokenize)
    (out / "prepare.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"done: {out} (train {counts['train']}, valid {counts['valid']}, test {counts['test']}, meta "
        f"{counts['meta']} pairs; {sum(flags)} corrupted train pairs flagged in train.flags)")
    return 0


# ====================================================================== subset
def subset(args) -> int:
    """Filter the train split of a data-bin (its ``text/spm.train.*``) by a keep list; binarize with the same
    dictionaries; share everything else. ``train.orig_ids`` maps the new train lines to the old ids."""
    data, out = Path(args.data), Path(args.out)
    src, tgt = args.src, args.tgt
    text = [data / "text" / f"spm.train.{lang}" for lang in (src, tgt)]
    for f in text + [data / f"dict.{src}.txt", data / f"dict.{tgt}.txt"]:
        if not f.exists():
            die(f"{f} not found: --data must be a data-bin written by prepare_multi30k.sh / prepare_iwslt14.sh "
                "(it keeps the sentencepiece text under text/)")
    s_lines, t_lines = read_lines(text[0]), read_lines(text[1])
    if args.keep_clean:
        flags = [int(x) for x in read_lines(data / "train.flags")]
        keep = [1 - f for f in flags]
        source = f"{data / 'train.flags'} (clean pairs)"
    else:
        keep = [int(x) for x in read_lines(args.keep)]
        source = args.keep
    if len(keep) != len(s_lines) or len(t_lines) != len(s_lines):
        die(f"{source} has {len(keep)} lines but the train split of {data} has {len(s_lines)} pairs: the keep "
            "list must have one 0/1 per train sentence id, in the split's order")
    if set(keep) - {0, 1}:
        die(f"{source}: the keep list must contain only 0 and 1")
    ids = [i for i, k in enumerate(keep) if k]
    if not ids:
        die(f"{source} keeps no pair")
    done = out / "subset.json"
    if done.exists():
        old = json.loads(done.read_text())
        if old.get("data") != str(data.resolve()) or old.get("kept") != len(ids) or old.get("keep") != source:
            die(f"{out} holds another subset ({old.get('keep')}, {old.get('kept')} pairs of {old.get('data')}): "
                "use another --out or delete it")
        log(f"subset: {out} exists, skipped", "subset")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    tmp_text = out / "text"
    tmp_text.mkdir(exist_ok=True)
    write_lines(tmp_text / f"spm.train.{src}", [s_lines[i] for i in ids])
    write_lines(tmp_text / f"spm.train.{tgt}", [t_lines[i] for i in ids])
    write_lines(out / "train.orig_ids", [str(i) for i in ids])
    flags = read_lines(data / "train.flags") if (data / "train.flags").exists() else ["0"] * len(keep)
    write_lines(out / "train.flags", [flags[i] for i in ids])
    tmp = out / "_bin_tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _run([_fairseq_preprocess(), "--source-lang", src, "--target-lang", tgt, "--srcdict", data / f"dict.{src}.txt",
          "--tgtdict", data / f"dict.{tgt}.txt", "--trainpref", tmp_text / "spm.train", "--destdir", tmp,
          "--workers", str(args.workers)], out / "preprocess.log")
    for f in sorted(tmp.glob("train.*")):
        os.replace(f, out / f.name)
    shutil.rmtree(tmp)
    for f in sorted(data.iterdir()):  # dictionaries, valid/test/meta, spm model, references: shared as they are
        if f.name.startswith(("dict.", "valid.", "test.", "meta.", "spm.")) or f.name in ("ref", "prepare.json"):
            dest = out / f.name
            if not dest.exists():
                os.symlink(f.resolve(), dest)
    done.write_text(json.dumps({"data": str(data.resolve()), "keep": source, "kept": len(ids),
                                "of": len(keep)}, indent=1) + "\n")
    log(f"subset: kept {len(ids)} of {len(keep)} train pairs of {data} -> {out}", "subset")
    return 0


# ====================================================================== IWSLT'14 text
_DROP = ("<url>", "<talkid>", "<keywords>")
_STRIP = re.compile(r"</?(title|description)>")
_SEG = re.compile(r'^\s*<seg id="?\d+"?>\s*(.*?)\s*</seg>\s*$')
IWSLT_TEST_SETS = ("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010", "IWSLT14.TED.tst2011",
                   "IWSLT14.TED.tst2012")


def iwslt_train_lines(path: Path) -> List[str]:
    """fairseq's prepare-iwslt14.sh on train.tags: drop url/talkid/keywords lines, strip title/description tags."""
    return [_STRIP.sub("", line) for line in read_lines(path) if not any(tag in line for tag in _DROP)]


def iwslt_xml_lines(path: Path) -> List[str]:
    """The <seg id="N"> contents of an IWSLT xml file, with ’ replaced by '."""
    out = []
    for line in read_lines(path):
        if "<seg id" in line:
            m = _SEG.match(line)
            seg = m.group(1) if m else re.sub(r"\s*</?seg[^>]*>\s*", "", line).strip()
            out.append(seg.replace("\u2019", "'"))
    return out


def clean_pairs(s: List[str], t: List[str], ratio: float = 1.5, lo: int = 1, hi: int = 175):
    """Moses clean-corpus-n.perl: keep pairs whose sides have lo..hi tokens and a length ratio <= ratio."""
    keep_s, keep_t = [], []
    for a, b in zip(s, t):
        la, lb = len(a.split()), len(b.split())
        if lo <= la <= hi and lo <= lb <= hi and la / lb <= ratio and lb / la <= ratio:
            keep_s.append(a)
            keep_t.append(b)
    return keep_s, keep_t


def iwslt_text(args) -> int:
    orig, out = Path(args.orig), Path(args.out)
    src, tgt = args.src, args.tgt
    pair = "de-en"
    if args.tok == "moses":
        try:
            from sacremoses import MosesTokenizer
        except ImportError:
            die("--tok moses needs sacremoses: pip install sacremoses (or use --tok spm)")
        toks = {lang: MosesTokenizer(lang=lang) for lang in (src, tgt)}

        def prep(lines, lang):
            return [toks[lang].tokenize(x, return_str=True, escape=True).lower() for x in lines]
    else:
        def prep(lines, lang):
            return [" ".join(x.split()) for x in lines]

    train = {}
    for lang in (src, tgt):
        f = orig / f"train.tags.{pair}.{lang}"
        lines = iwslt_train_lines(f)
        train[lang] = prep(lines, lang)
        log(f"iwslt: {f}: {len(lines)} lines after tag removal", "iwslt")
    if len(train[src]) != len(train[tgt]):
        die(f"train.tags sides differ after tag removal: {len(train[src])} vs {len(train[tgt])} lines")
    s, t = clean_pairs(train[src], train[tgt], args.clean_ratio, 1, args.max_len)
    log(f"iwslt: cleaning (1..{args.max_len} tokens, ratio {args.clean_ratio}): kept {len(s)}/{len(train[src])} "
        "pairs", "iwslt")
    # fairseq's recipe: every 23rd line is valid, the rest train
    split = {"valid": ([x for i, x in enumerate(s, 1) if i % 23 == 0], [x for i, x in enumerate(t, 1) if i % 23 == 0]),
             "train": ([x for i, x in enumerate(s, 1) if i % 23 != 0], [x for i, x in enumerate(t, 1) if i % 23 != 0])}
    test = {src: [], tgt: []}
    for name in IWSLT_TEST_SETS:
        for lang in (src, tgt):
            f = orig / f"{name}.{pair}.{lang}.xml"
            if not f.exists():
                die(f"missing IWSLT test file {f}")
            test[lang] += prep(iwslt_xml_lines(f), lang)
        if len(test[src]) != len(test[tgt]):
            die(f"{name}: {src} and {tgt} have different numbers of segments")
    split["test"] = (test[src], test[tgt])
    for name, (a, b) in split.items():
        write_lines(out / f"{name}.{src}", a)
        write_lines(out / f"{name}.{tgt}", b)
        log(f"iwslt: {name}: {len(a)} pairs -> {out / name}.{{{src},{tgt}}}", "iwslt")
    return 0


# ====================================================================== scoring
_GEN = re.compile(r"^([SHTD])-(\d+)\t(.*)$")


def parse_generate(lines) -> Dict[int, str]:
    """Hypothesis token strings by sentence id from fairseq-generate output (the first H- line of each id).

    Works whether or not ``--post-process`` was given: ``H-id<TAB>score<TAB>tokens``.
    """
    hyps: Dict[int, str] = {}
    for line in lines:
        m = _GEN.match(line.rstrip("\n"))
        if not m or m.group(1) != "H":
            continue
        i = int(m.group(2))
        if i in hyps:
            continue  # --nbest > 1: keep the best (first printed)
        fields = m.group(3).split("\t")
        hyps[i] = fields[1] if len(fields) > 1 else ""
    return hyps


def order_hypotheses(hyps: Dict[int, str], n: int) -> List[str]:
    """Hypotheses in the original order of the split (``S-``/``H-`` ids are 0-based line numbers)."""
    bad = [i for i in hyps if not 0 <= i < n]
    if bad:
        die(f"generate output has sentence ids {bad[:5]} outside the {n} reference lines: wrong --raw-ref?")
    missing = [i for i in range(n) if i not in hyps]
    if missing:
        die(f"generate output has no hypothesis for {len(missing)} of {n} sentences (e.g. ids {missing[:5]}): "
            "incomplete generation, or the reference does not match the split")
    return [hyps[i] for i in range(n)]


def decode_pieces(lines: List[str], spm_model: Optional[str]) -> List[str]:
    if not spm_model:
        return lines
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    return [sp.decode_pieces(line.split()) for line in lines]


def score(args) -> int:
    from sacrebleu.metrics import BLEU, CHRF

    gen = read_lines(args.gen)
    refs = read_lines(args.ref)
    hyps = order_hypotheses(parse_generate(gen), len(refs))
    hyps = decode_pieces(hyps, args.spm)
    if args.hyp_out:
        write_lines(args.hyp_out, hyps)
    bleu, chrf = BLEU(tokenize=args.tokenize), CHRF()
    b = bleu.corpus_score(hyps, [refs])
    c = chrf.corpus_score(hyps, [refs])
    result = {
        "bleu": round(b.score, 2), "chrf": round(c.score, 2), "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()), "bleu_str": str(b), "chrf_str": str(c), "sentences": len(refs),
        "ref": str(args.ref), "hyp": str(args.hyp_out) if args.hyp_out else None,
    }
    if args.extra:
        result.update(json.loads(args.extra))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"BLEU = {b.score:.2f}  ({bleu.get_signature()})")
    print(f"chrF = {c.score:.2f}  ({chrf.get_signature()})")
    print(b)
    return 0


# ====================================================================== CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    b = sub.add_parser("build", help="raw text -> meta hold-out -> noise -> spm -> data-bin", formatter_class=fmt)
    b.add_argument("--raw-dir", required=True, help="folder with {train,valid,test}.{SRC,TGT} raw text")
    b.add_argument("--out", required=True, help="data-bin folder to write")
    b.add_argument("--src", default="de")
    b.add_argument("--tgt", default="en")
    b.add_argument("--vocab", type=int, default=8000, help="joint sentencepiece vocabulary size")
    b.add_argument("--spm-model-type", default="unigram", choices=("unigram", "bpe"))
    b.add_argument("--character-coverage", type=float, default=1.0)
    b.add_argument("--spm-model", default=None, help="reuse this sentencepiece model instead of training one")
    b.add_argument("--meta-size", type=int, default=1000, help="clean pairs held out of train as the meta split")
    b.add_argument("--seed", type=int, default=1, help="seed of the meta hold-out, the noise and sentencepiece")
    b.add_argument("--noise", default="none", choices=("none",) + tuple(noise_module().TYPES))
    b.add_argument("--noise-rate", type=float, default=0.0)
    b.add_argument("--noise-on", default="raw", choices=("raw", "spm"), help="corrupt raw text or spm pieces")
    b.add_argument("--token-rate", type=float, default=0.1)
    b.add_argument("--token-side", default="tgt", choices=("src", "tgt", "both"))
    b.add_argument("--bleu-tokenize", default="13a", help="sacrebleu tokenizer eval_bleu.sh should use")
    b.add_argument("--workers", type=int, default=1)
    b.set_defaults(func=build)

    w = sub.add_parser("iwslt-text", help="IWSLT'14 raw (extracted de-en/) -> {train,valid,test}.{de,en}",
                       formatter_class=fmt)
    w.add_argument("--orig", required=True, help="the extracted de-en/ folder of de-en.tgz")
    w.add_argument("--out", required=True)
    w.add_argument("--src", default="de")
    w.add_argument("--tgt", default="en")
    w.add_argument("--tok", default="spm", choices=("spm", "moses"),
                   help="spm: keep raw text (sentencepiece later); moses: Moses-tokenise + lowercase (sacremoses)")
    w.add_argument("--max-len", type=int, default=175)
    w.add_argument("--clean-ratio", type=float, default=1.5)
    w.set_defaults(func=iwslt_text)

    u = sub.add_parser("subset", help="data-bin -> train filtered by a keep list, same dictionaries",
                       formatter_class=fmt)
    u.add_argument("--data", required=True, help="data-bin from prepare_multi30k.sh / prepare_iwslt14.sh")
    u.add_argument("--out", required=True, help="data-bin folder to write")
    g = u.add_mutually_exclusive_group(required=True)
    g.add_argument("--keep", help="file with one 0/1 per train sentence id (1 = keep)")
    g.add_argument("--keep-clean", action="store_true", help="keep the pairs train.flags marks clean (perfect weights)")
    u.add_argument("--src", default="de")
    u.add_argument("--tgt", default="en")
    u.add_argument("--workers", type=int, default=1)
    u.set_defaults(func=subset)

    s = sub.add_parser("score", help="fairseq-generate output -> BLEU/chrF JSON", formatter_class=fmt)
    s.add_argument("--gen", required=True, help="fairseq-generate stdout")
    s.add_argument("--ref", required=True, help="raw reference, one line per sentence of the split")
    s.add_argument("--spm", default=None, help="sentencepiece model to decode the hypotheses (none: as is)")
    s.add_argument("--hyp-out", default=None, help="write the decoded hypotheses here")
    s.add_argument("--json", default=None, help="write the scores here")
    s.add_argument("--tokenize", default="13a", help="sacrebleu tokenizer (none for pre-tokenised references)")
    s.add_argument("--extra", default=None, help="JSON object merged into the output JSON")
    s.set_defaults(func=score)

    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
