"""The catalogue of user mistakes: every case is a command line and its expected outcome.

Expected for every case: exit status 2, exactly one line on stderr ("error: what is wrong; what to do"),
no traceback, and every file that existed before the command byte-for-byte unchanged (sha256 of every
file in the tree). The CLI runs in-process (glassgpt.cli.main) over one tiny tree built once per
module: a char dataset with a span index, a random 2-layer checkpoint with a kNN store, damaged and
foreign checkpoints, a Hugging Face export. The range cases are generated from glassgpt.config.RANGES
and each command's config class, so a new field with a range is covered by adding it to the table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import typing
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from glassgpt import cli
from glassgpt.config import RANGES, BenchConfig, SampleConfig, TrainConfig
from tests.conftest import make_char_dataset, make_checkpoint


@dataclass
class Case:
    id: str
    argv: list[str]
    must: tuple[str, ...] = ()
    """Substrings the error line must contain (case-insensitive)."""
    must_not: tuple[str, ...] = ()
    setup: typing.Callable[[Path], None] | None = None


class Evil:
    """Pickles to a call of print(): a checkpoint carrying it must be refused by a safe load."""

    def __reduce__(self):
        return (print, ("this must never run",))


def _build_tree(root: Path) -> None:
    data = make_char_dataset(root / "data" / "tiny_char")
    out = root / "out"
    make_checkpoint(out, data)
    assert cli.main(["trace-spans", f"--data_dir={data}", "--build"]) == 0
    shutil.copytree(out, root / "out_knn")
    assert cli.main(["trace-knn", f"--out_dir={root / 'out_knn'}", "--build", "--device=cpu"]) == 0
    shutil.copytree(root / "out_knn", root / "out_stale")
    make_checkpoint(root / "out_stale", data, seed=1)  # other weights under the same store
    for name, cut in (("data_trunc", 3), ("data_trunc_aligned", 64)):
        copy = root / name
        shutil.copytree(data, copy)
        arrays = sorted((p for p in (copy / "spans").rglob("*") if p.is_file() and not p.name.endswith(".json")),
                        key=lambda p: p.stat().st_size)
        big = arrays[-1]
        big.write_bytes(big.read_bytes()[:-cut])
    # prepared data (its meta.json records the fingerprint) whose train.bin is then rewritten in place,
    # same size: the recorded sizes still match, so only the size+mtime check notices
    from glassgpt.prepare import main as prepare

    (root / "rewrite.txt").write_text("First Citizen: Before we proceed any further, hear me speak.\n" * 20)
    rewritten = root / "data_rewritten"
    prepare(["shakespeare_char", f"--input={root / 'rewrite.txt'}", f"--out_dir={rewritten}"])
    assert cli.main(["trace-spans", f"--data_dir={rewritten}", "--build"]) == 0
    train = bytearray((rewritten / "train.bin").read_bytes())
    train[0:2], train[2:4] = train[2:4], train[0:2]
    with open(rewritten / "train.bin", "r+b") as f:
        f.write(bytes(train))
    good = (out / "ckpt.pt").read_bytes()
    bad = root / "bad"
    for kind in ("trunc", "zip", "reduce", "garbage", "foreign", "empty"):
        (bad / kind).mkdir(parents=True)
    (bad / "trunc" / "ckpt.pt").write_bytes(good[: len(good) // 2])
    with zipfile.ZipFile(bad / "zip" / "ckpt.pt", "w") as z:
        z.writestr("hello.txt", "a zip file that is not a checkpoint")
    torch.save({"model": {"x": torch.zeros(1)}, "payload": Evil()}, bad / "reduce" / "ckpt.pt")
    (bad / "garbage" / "ckpt.pt").write_bytes(b"not a checkpoint at all\n" * 40)
    torch.save({"weights": torch.zeros(2)}, bad / "foreign" / "ckpt.pt")
    (bad / "empty" / "ckpt.pt").write_bytes(b"")
    assert cli.main(["export", f"--out_dir={out}", "--to=hf", str(root / "hf")]) == 0
    (root / "nonempty").mkdir()
    (root / "nonempty" / "config.json").write_text('{"model_type": "someone else\'s model"}')
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("\n\n  \n")
    (root / "afile").write_text("a file where a directory is expected")
    (root / "unseen.txt").write_text("日本語のテキスト")
    (root / "bad.jsonl").write_text('{"ctx": "a", "endings": ["b"]\nnot json\n')
    (root / "cfg_unknown.py").write_text("lerning_rate = 1e-3\n")
    (root / "cfg_raises.py").write_text("batch_size = 1 / 0\n")
    (root / "cfg_range.py").write_text("batch_size = 0\n")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("catalogue")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        _build_tree(root)
    finally:
        os.chdir(cwd)
    return root


# --- the cases -----------------------------------------------------------------------------------
# {root}, {data}, {out} ... are filled in with the tree's paths.

TRAIN = ["train", "--device=cpu", "--compile=False", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=8",
         "--batch_size=2", "--gradient_accumulation_steps=1", "--max_iters=2", "--eval_interval=1", "--eval_iters=1",
         "--warmup_iters=0", "--lr_decay_iters=2", "--data_dir={data}", "--dataset=tiny_char", "--plot=False",
         "--out_dir={root}/train_out"]
SAMPLE = ["sample", "--out_dir={out}", "--device=cpu", "--num_samples=1", "--max_new_tokens=4"]
BENCH = ["bench", "--device=cpu", "--compile=False", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=8",
         "--batch_size=2", "--real_data=False", "--num_steps=1"]
EVAL = ["eval", "--out_dir={out}", "--device=cpu", "--data_dir={data}"]
EXPORT = ["export", "--out_dir={out}", "--to=hf", "{root}/export_dest"]
KNN = ["trace-knn", "--out_dir={out_knn}", "--device=cpu", "--text=First Citizen"]
KNN_GEN = ["trace-knn", "--out_dir={out_knn}", "--device=cpu", "--start=First", "--max_new_tokens=4"]
SPANS = ["trace-spans", "--data_dir={data}", "--text=First Citizen: Before we proceed"]
SPANS_GEN = ["trace-spans", "--out_dir={out}", "--data_dir={data}", "--start=First", "--max_new_tokens=4"]
NEURONS = ["trace-neurons", "--out_dir={out}", "--device=cpu", "--start=First", "--max_new_tokens=4"]
NEURON = ["neuron", "--out_dir={out}", "--device=cpu", "--layer=0", "--index=0", "--max_windows=4"]
EXTEND = ["extend-context", "--out_dir={out}", "--block_size=64", "--new_out_dir={root}/extended"]
PREP_CORPUS = ["prepare", "corpus", "--input={data}/../../blank.txt", "--tokenizer=char", "--out_dir={root}/prep"]
PREP_SHAKE = ["prepare", "shakespeare_char", "--out_dir={root}/prep_shake"]
REPORT = ["report", "--out_dir={out}", "--device=cpu", "--start=First", "--max_new_tokens=4",
          "--out={root}/report.html"]


def _config_classes() -> dict[str, tuple[type, list[str]]]:
    """command -> (its config class, a base command line that is valid up to the checked value)."""
    from glassgpt.evaluate import EvalConfig
    from glassgpt.export import ExportConfig
    from glassgpt.extend import ExtendConfig
    from glassgpt.prepare import CorpusConfig
    from glassgpt.trace.knn import TraceKnnConfig
    from glassgpt.trace.neuron_card import NeuronConfig
    from glassgpt.trace.neurons import TraceNeuronsConfig
    from glassgpt.trace.spans import TraceSpansConfig
    from glassgpt.view.report import ReportConfig

    return {"train": (TrainConfig, TRAIN), "sample": (SampleConfig, SAMPLE), "bench": (BenchConfig, BENCH),
            "report": (ReportConfig, REPORT), "eval": (EvalConfig, EVAL), "export": (ExportConfig, EXPORT),
            "trace-knn": (TraceKnnConfig, KNN),
            "trace-spans": (TraceSpansConfig, SPANS), "trace-neurons": (TraceNeuronsConfig, NEURONS),
            "neuron": (NeuronConfig, NEURON), "extend-context": (ExtendConfig, EXTEND),
            "prepare-corpus": (CorpusConfig, PREP_CORPUS)}


def _outside(key: str, numeric: type) -> list[object]:
    """Values just outside RANGES[key], of the field's type."""
    r = RANGES[key]
    vals: list[float] = []
    if r.lo is not None:
        vals.append(r.lo if r.lo_open else r.lo - 1)
    if r.hi is not None:
        vals.append(r.hi if r.hi_open else r.hi + 1)
    return [numeric(v) for v in vals]


def range_cases() -> list[Case]:
    cases = []
    for cmd, (cls, base) in _config_classes().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in RANGES:
                continue
            kinds = [k for k in typing.get_args(hints[f.name]) or (hints[f.name],) if k in (int, float)]
            if not kinds:
                continue
            for v in _outside(f.name, kinds[0]):
                cases.append(Case(f"range-{cmd}-{f.name}={v}", [*base, f"--{f.name}={v}"], must=(f.name, "range")))
    return cases


def choice_cases() -> list[Case]:
    """Every Literal[...] field of every command: a value outside its choices is the same one line,
    naming the key, the value and every choice."""
    from glassgpt.config import choices

    cases = []
    for cmd, (cls, base) in _config_classes().items():
        for key, tp in typing.get_type_hints(cls).items():
            if choices(tp):
                cases.append(Case(f"choice-{cmd}-{key}", [*base, f"--{key}=bogus"],
                                  must=(f"{key}='bogus' is not one of {', '.join(map(str, choices(tp)))}",)))
    return cases


CORRUPT = ("trunc", "zip", "reduce", "garbage", "foreign", "empty")
CKPT_COMMANDS = {
    "sample": ["sample", "--device=cpu", "--num_samples=1", "--max_new_tokens=4"],
    "eval": ["eval", "--device=cpu", "--data_dir={data}"],
    "export": ["export", "--to=hf", "{root}/export_dest"],
    "trace-knn": ["trace-knn", "--device=cpu", "--text=First", "--build"],
    "trace-neurons": ["trace-neurons", "--device=cpu", "--max_new_tokens=4"],
    "neuron": ["neuron", "--device=cpu", "--layer=0", "--index=0", "--data_dir={data}"],
    "extend-context": ["extend-context", "--block_size=64", "--new_out_dir={root}/extended"],
    "train-resume": [*TRAIN[:-1], "--init_from=resume"],
    "trace-spans-gen": ["trace-spans", "--start=First", "--max_new_tokens=4", "--data_dir={data}"],
}


def checkpoint_cases() -> list[Case]:
    cases = []
    for cmd, argv in CKPT_COMMANDS.items():
        cases.append(Case(f"missing-ckpt-{cmd}", [*argv, "--out_dir={root}/nowhere"], must=("nowhere",)))
        for kind in CORRUPT:
            must_not = ("weights_only=False",) if kind == "reduce" else ()
            must = ("safe",) if kind == "reduce" else ("ckpt.pt",)
            cases.append(Case(f"{kind}-ckpt-{cmd}", [*argv, f"--out_dir={{root}}/bad/{kind}"], must=must,
                              must_not=must_not))
    return cases


def _unknown_and_type_cases() -> list[Case]:
    c = Case
    return [
        c("unknown-command", ["trian"], must=("train",)),
        c("unknown-dataset", ["prepare", "shakespear"], must=("shakespeare",)),
        c("unknown-train", [*TRAIN, "--lerning_rate=1e-3"], must=("learning_rate",)),
        c("unknown-sample", [*SAMPLE, "--temprature=0.5"], must=("temperature",)),
        c("unknown-bench", [*BENCH, "--num_step=1"], must=("num_steps",)),
        c("unknown-eval", [*EVAL, "--strid=1"], must=("stride",)),
        c("unknown-export", [*EXPORT, "--vocab_dri=x"], must=("vocab_dir",)),
        c("unknown-knn", [*KNN, "--top_kk=3"], must=("top_k",)),
        c("unknown-spans", [*SPANS, "--max_new_token=3"], must=("max_new_tokens",)),
        c("unknown-neurons", [*NEURONS, "--contrastve"], must=("contrastive",)),
        c("unknown-neuron", [*NEURON, "--layr=0"], must=("layer",)),
        c("unknown-extend", [*EXTEND, "--block_sise=64"], must=("block_size",)),
        c("unknown-prepare-corpus", [*PREP_CORPUS, "--inpt=x"], must=("input",)),
        c("unknown-prepare-shakespeare", [*PREP_SHAKE, "--out_dri=x"], must=("out_dir",)),
        c("config-file-unknown-key", ["train", "{root}/cfg_unknown.py"], must=("learning_rate",)),
        c("config-file-raises", ["train", "{root}/cfg_raises.py"], must=("cfg_raises.py",)),
        c("config-file-range", ["train", "{root}/cfg_range.py"], must=("batch_size", "range")),
        c("config-file-missing", ["train", "{root}/nothere.py"], must=("nothere.py",)),
        c("flag-without-value", [*TRAIN, "--batch_size"], must=("batch_size",)),
        c("type-train-batch_size", [*TRAIN, "--batch_size=abc"], must=("batch_size",)),
        c("type-train-learning_rate", [*TRAIN, "--learning_rate=fast"], must=("learning_rate",)),
        c("type-train-compile", [*TRAIN, "--compile=maybe"], must=("compile",)),
        c("type-train-dropout-none", [*TRAIN, "--dropout=None"], must=("dropout",)),
        c("type-sample-max_new_tokens", [*SAMPLE, "--max_new_tokens=ten"], must=("max_new_tokens",)),
        c("type-sample-temperature", [*SAMPLE, "--temperature=hot"], must=("temperature",)),
        c("type-sample-top_k", [*SAMPLE, "--top_k=1.5"], must=("top_k",)),
        c("type-spans-max_new_tokens", [*SPANS_GEN, "--max_new_tokens=x"], must=("max_new_tokens",)),
        c("type-knn-k", [*KNN, "--k=many"], must=("k",)),
        c("type-neurons-top_k", [*NEURONS, "--top_k=x"], must=("top_k",)),
        c("type-neurons-n_neurons", [*NEURONS, "--n_neurons=x"], must=("n_neurons",)),
        c("renamed-sample-window", [*SAMPLE, "--window=sliding"], must=("window_rule",)),
        c("renamed-knn-context", [*KNN, "--context=16"], must=("unknown", "context")),
        c("type-neuron-layer", [*NEURON, "--layer=a"], must=("layer",)),
        c("type-eval-stride", [*EVAL, "--stride=x"], must=("stride",)),
        c("type-extend-block_size", [*EXTEND, "--block_size=big"], must=("block_size",)),
        c("type-bench-num_steps", [*BENCH, "--num_steps=x"], must=("num_steps",)),
        c("type-prepare-val_fraction", [*PREP_CORPUS, "--val_fraction=half"], must=("val_fraction",)),
    ]


def _input_cases() -> list[Case]:
    c = Case
    return [
        # missing inputs
        c("missing-data-train", [*TRAIN, "--data_dir={root}/nodata"], must=("nodata",)),
        c("missing-data-spans", [*SPANS, "--data_dir={root}/nodata"], must=("nodata",)),
        c("missing-data-eval", [*EVAL, "--data_dir={root}/nodata"], must=("nodata",)),
        c("missing-data-neuron", [*NEURON, "--data_dir={root}/nodata"], must=("nodata",)),
        c("missing-data-neurons-contrastive", [*NEURONS, "--contrastive", "--data_dir={root}/nodata"],
          must=("nodata",)),
        c("missing-input-prepare-corpus", [*PREP_CORPUS, "--input={root}/missing.txt"], must=("missing.txt",)),
        c("missing-input-prepare-shakespeare", [*PREP_SHAKE, "--input={root}/missing.txt"], must=("missing.txt",)),
        c("missing-start-file-sample", [*SAMPLE, "--start=FILE:{root}/missing.txt"], must=("missing.txt",)),
        c("missing-text-file-spans", [*SPANS, "--text=FILE:{root}/missing.txt"], must=("missing.txt",)),
        c("missing-text-file-knn", [*KNN, "--text=FILE:{root}/missing.txt"], must=("missing.txt",)),
        c("missing-eval-text", [*EVAL[:-1], "--text={root}/missing.txt"], must=("missing.txt",)),
        c("missing-eval-mc", [*EVAL[:-1], "--mc={root}/missing.jsonl"], must=("missing.jsonl",)),
        c("missing-span-index", ["trace-spans", "--data_dir={data}", "--index_dir={root}/noindex", "--text=First"],
          must=("--build",)),
        c("missing-knn-store", [*KNN, "--store_dir={root}/nostore"], must=("--build",)),
        c("eval-nothing-to-score", ["eval", "--out_dir={out}", "--device=cpu"], must=("text",)),
        c("eval-malformed-mc", [*EVAL[:-1], "--mc={root}/bad.jsonl"], must=("bad.jsonl",)),
        # the tokenizer cannot encode it
        c("unseen-chars-sample", [*SAMPLE, "--start=日本"], must=("日",)),
        c("unseen-chars-knn", [*KNN, "--text=日本"], must=("日",)),
        c("unseen-chars-knn-gen", [*KNN_GEN, "--start=日本"], must=("日",)),
        c("unseen-chars-neurons", [*NEURONS, "--start=日本"], must=("日",)),
        c("unseen-chars-spans-gen", [*SPANS_GEN, "--start=日本"], must=("日",)),
        c("unseen-chars-eval-text", [*EVAL[:-1], "--text={root}/unseen.txt"], must=("日",)),
        # broken or stale derived artifacts
        c("truncated-span-index", ["trace-spans", "--data_dir={root}/data_trunc", "--text=First Citizen"],
          must=("--build",)),
        c("truncated-span-index-aligned", ["trace-spans", "--data_dir={root}/data_trunc_aligned",
                                           "--text=First Citizen"], must=("--build",)),
        c("truncated-span-index-aligned-locate", ["trace-spans", "--data_dir={root}/data_trunc_aligned",
                                                  "--locate=Speak"], must=("--build",)),
        c("stale-knn-store", ["trace-knn", "--out_dir={out_stale}", "--device=cpu", "--text=First"],
          must=("--build",)),
        c("span-index-data-rewritten-same-size", ["trace-spans", "--data_dir={root}/data_rewritten", "--text=First"],
          must=("stale", "--build")),
        # a text with no word BM25 indexes, ranked by BM25 (the default); by embedding it answers
        c("knn-bm25-only-stopwords", [*KNN[:-1], "--text=and it is the"], must=("--rank=embedding",)),
        c("knn-bm25-single-letters", [*KNN[:-1], "--text=a c d e"], must=("--rank=embedding",)),
        c("knn-bm25-only-punctuation", [*KNN[:-1], "--text=?.. ,:"], must=("--rank=embedding",)),
        # training that cannot go on
        c("nan-loss", [*TRAIN, "--learning_rate=1e30", "--max_iters=4", "--grad_clip=0.0"], must=("nan",)),
        c("activation-with-gpt2-init", [*TRAIN, "--init_from={root}/hf", "--activation=gelu_new"],
          must=("activation",)),
        c("resume-without-checkpoint", [*TRAIN[:-1], "--out_dir={root}/fresh", "--init_from=resume"],
          must=("fresh",)),
        c("indivisible-parallel", [*TRAIN, "--parallel=zero"], must=("parallel",)),
        c("block-size-larger-than-data", [*TRAIN, "--block_size=100000"], must=("block_size",)),
        # places that cannot be written
        c("unwritable-out_dir-train", [*TRAIN, "--out_dir={root}/afile/sub"], must=("afile",)),
        c("unwritable-extend", [*EXTEND[:-1], "--new_out_dir={root}/afile/sub"], must=("afile",)),
        c("unwritable-export", [*EXPORT[:-1], "{root}/afile/sub"], must=("afile",)),
        c("unwritable-prepare", [*PREP_SHAKE[:-1], "--out_dir={root}/afile/sub"], must=("afile",)),
        c("unwritable-span-index", ["trace-spans", "--data_dir={data}", "--build", "--index_dir={root}/afile/sub"],
          must=("afile",)),
        c("unwritable-knn-store", ["trace-knn", "--out_dir={out}", "--device=cpu", "--build",
                                   "--store_dir={root}/afile/sub"], must=("afile",)),
        # empty input
        c("empty-corpus-char", [*PREP_CORPUS[:-2], "--input={root}/empty.txt", "--tokenizer=char",
                                "--out_dir={root}/prep"], must=("empty",)),
        c("blank-corpus-char", PREP_CORPUS, must=("document",)),
        c("empty-shakespeare-input", [*PREP_SHAKE, "--input={root}/empty.txt"], must=("empty",)),
        c("empty-eval-text", [*EVAL[:-1], "--text={root}/empty.txt"], must=("empty",)),
        # overwriting what is there
        c("export-into-nonempty-dir", [*EXPORT[:-1], "{root}/nonempty"], must=("--overwrite",)),
        c("extend-onto-itself", [*EXTEND[:-1], "--new_out_dir={out}"], must=("--overwrite",)),
        # values each command checks itself
        c("sample-top_k-0", [*SAMPLE, "--top_k=0"], must=("top_k",)),
        c("spans-top_k-0", [*SPANS_GEN, "--top_k=0"], must=("top_k",)),
        c("knn-top_k-0", [*KNN_GEN, "--top_k=0"], must=("top_k",)),
        c("spans-negative-temperature", [*SPANS_GEN, "--temperature=-1"], must=("temperature",)),
        c("knn-negative-temperature", [*KNN_GEN, "--temperature=-1"], must=("temperature",)),
        c("neurons-negative-temperature", [*NEURONS, "--temperature=-0.5"], must=("temperature",)),
        c("spans-negative-max_new_tokens", [*SPANS_GEN, "--max_new_tokens=-5"], must=("max_new_tokens",)),
        c("knn-negative-max_new_tokens", [*KNN_GEN, "--max_new_tokens=-5"], must=("max_new_tokens",)),
        c("neurons-negative-max_new_tokens", [*NEURONS, "--max_new_tokens=-5"], must=("max_new_tokens",)),
        c("eval-stride-0", [*EVAL, "--stride=0"], must=("stride",)),
        c("eval-stride-over-block", [*EVAL, "--stride=1000"], must=("stride",)),
        c("sample-device", [*SAMPLE, "--device=tpu"], must=("tpu",)),
        c("sample-dtype", [*SAMPLE, "--dtype=int8"], must=("int8",)),
        c("sample-window", [*SAMPLE, "--window_rule=bogus"], must=("bogus", "chunked, sliding")),
        c("train-device", [*TRAIN, "--device=tpu"], must=("tpu",)),
        c("knn-search", [*KNN, "--search=bogus"], must=("bogus",)),
        c("neurons-score", [*NEURONS, "--score=bogus"], must=("bogus",)),
        c("neurons-ablation", [*NEURONS, "--ablate", "--ablation=bogus"], must=("bogus",)),
        c("neuron-layer-outside-model", [*NEURON, "--layer=99"], must=("layer",)),
        c("neuron-index-outside-model", [*NEURON, "--index=99999"], must=("index",)),
        c("neuron-layer-missing", ["neuron", "--out_dir={out}", "--device=cpu", "--index=0"], must=("layer",)),
        c("extend-shorter", [*EXTEND[:-2], "--block_size=16", "--new_out_dir={root}/extended"], must=("block_size",)),
        c("extend-method", [*EXTEND, "--method=bogus"], must=("bogus",)),
        c("extend-no-block-size", ["extend-context", "--out_dir={out}"], must=("block_size",)),
        c("export-format", [*EXPORT[:-2], "--to=onnx", "{root}/export_dest"], must=("onnx",)),
        c("export-no-dest", ["export", "--out_dir={out}", "--to=hf"], must=("export",)),
        c("prepare-tokenizer", [*PREP_CORPUS, "--tokenizer=bogus"], must=("bogus",)),
    ]


CASES = range_cases() + choice_cases() + checkpoint_cases() + _unknown_and_type_cases() + _input_cases()


def snapshot(root: Path, caches: bool = False) -> dict[str, str]:
    """sha256 of every file under root; fingerprint caches (`.NAME.fingerprint.json`, a derived cache
    that may be written by a read) only with `caches`: their own test is below."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and (caches or not p.name.endswith(".fingerprint.json"))}


def test_catalogue_is_big_and_ids_unique():
    ids = [c.id for c in CASES]
    print(f"{len(CASES)} cases")
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    assert len(CASES) >= 100


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_user_mistake_is_one_line_and_changes_nothing(case: Case, tree: Path, capsys, monkeypatch):
    monkeypatch.chdir(tree)
    paths = {"root": tree, "data": tree / "data" / "tiny_char", "out": tree / "out", "out_knn": tree / "out_knn",
             "out_stale": tree / "out_stale"}
    argv = [a.format(**paths) for a in case.argv]
    if case.setup:
        case.setup(tree)
    before = snapshot(tree)
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as e:  # a command that exits itself
        code = e.code
    out, err = capsys.readouterr()
    after = snapshot(tree)
    lines = [line for line in err.splitlines() if line.strip()]
    print(f"argv: {argv}\nexit {code}\nstderr: {err[-2000:]}")
    assert "Traceback" not in err
    assert code == 2, f"exit {code}, stdout tail: {out[-500:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    low = lines[0].lower()
    for s in case.must:
        assert s.lower() in low, f"{s!r} not in {lines[0]!r}"
    for s in case.must_not:
        assert s.lower() not in low, f"{s!r} in {lines[0]!r}"
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"files changed or removed: {changed}"


def test_queries_do_not_rewrite_the_fingerprint_cache(tree: Path, capsys, monkeypatch):
    """A fingerprint is computed once; a query over the same data must not rewrite its cache (the
    span index and the run layer must agree on what the data's fingerprint covers)."""
    monkeypatch.chdir(tree)
    data, out = tree / "data" / "tiny_char", tree / "out_knn"
    queries = [["trace-spans", f"--data_dir={data}", "--text=First Citizen"],
               ["trace-knn", f"--out_dir={out}", "--device=cpu", "--text=First Citizen"]]
    for q in queries:
        assert cli.main(q) == 0
    before = snapshot(tree, caches=True)
    for q in queries:
        assert cli.main(q) == 0
    after = snapshot(tree, caches=True)
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"rewritten by a query: {changed}"


def test_disk_full_while_torch_save_writes_a_checkpoint(tmp_path: Path, capsys, monkeypatch):
    """The disk fills inside torch.save's zip writer (which reports it as "RuntimeError: ... unexpected
    pos"): one disk-full line, exit 2, and the checkpoint already in out_dir intact."""
    import errno

    data = make_char_dataset(tmp_path / "data" / "tiny_char")
    out = tmp_path / "train_out"
    argv = [a.format(root=tmp_path, data=data) for a in TRAIN]
    assert cli.main(argv) == 0
    before = snapshot(out)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # most of the file reaches the disk, then the disk is full
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    monkeypatch.setattr(torch, "save", full_disk)
    capsys.readouterr()
    code = cli.main([*argv, "--init_from=resume", "--max_iters=4", "--always_save_checkpoint=True"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert "disk is full" in lines[0] and "unexpected pos" not in lines[0], lines[0]
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k != "log.jsonl"} == {k: v for k, v in before.items()
                                                                     if k != "log.jsonl"}
