"""Tests for gpt_recipe.data (examples/): stdlib corpus -> BPE -> Megatron .bin/.idx -> GPTDataset."""

import json
import os
import pickle
import subprocess
import sys
import sysconfig
import textwrap
import warnings

import numpy
import pytest
import torch

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")

from megatron.core.datasets.blended_dataset import BlendedDataset  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDataset  # noqa: E402
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset  # noqa: E402
from megatron.core.tokenizers import MegatronTokenizerBase  # noqa: E402

from gpt_recipe import data  # noqa: E402
from gpt_recipe.data import (  # noqa: E402
    EOD_TOKEN,
    CorpusTokenizer,
    build_gpt_datasets,
    default_corpus_files,
    prepare_corpus,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_BYTES = 400_000
SEQ = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small stdlib corpus prepared once for the module (vocab 512)."""
    out = tmp_path_factory.mktemp("corpus")
    files = default_corpus_files(max_bytes=SMALL_BYTES)
    record = prepare_corpus(str(out / "stdlib"), files=files, vocab_size=512)
    return record, files


def _write_docs(directory, texts):
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(texts):
        p = directory / f"doc{i:02d}.txt"
        p.write_text(text, encoding="utf-8")
        paths.append(str(p))
    return paths


# ------------------------------------------------------------------------------ corpus


def test_default_corpus_comes_from_stdlib_deterministic_and_capped():
    stdlib = os.path.abspath(sysconfig.get_paths()["stdlib"])
    files = default_corpus_files(max_bytes=SMALL_BYTES)
    assert files == default_corpus_files(max_bytes=SMALL_BYTES)
    assert len(files) > 10
    rel = [os.path.relpath(f, stdlib).replace(os.sep, "/") for f in files]
    assert rel == sorted(rel)
    for r in rel:
        assert r.endswith(".py") and not r.startswith("..")
        parts = set(r.split("/")[:-1])
        assert not parts & {"site-packages", "test", "tests", "idle_test"}
    total = sum(os.path.getsize(f) for f in files)
    assert SMALL_BYTES * 0.9 < total <= SMALL_BYTES

    # A larger cap takes more; the uncapped corpus has the real stdlib modules, no tests.
    everything = default_corpus_files(max_bytes=None)
    assert len(everything) > len(files)
    rel_all = {os.path.relpath(f, stdlib).replace(os.sep, "/") for f in everything}
    assert {"json/decoder.py", "os.py", "collections/__init__.py"} <= rel_all
    assert not any(r.startswith(("test/", "lib2to3/tests/", "idlelib/idle_test/")) for r in rel_all)


def test_default_corpus_skip_rules_and_greedy_cap(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "a.py").write_text("a = 1\n")  # 6 bytes
    (root / "pkg" / "b.py").write_text("b = 22222\n")  # 10 bytes
    (root / "pkg" / "c.txt").write_text("not python\n")
    (root / "zz.py").write_text("z\n")  # 2 bytes
    (root / "empty.py").write_text("")
    (root / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    for skipped in ("test", "tests", "site-packages", "idlelib/idle_test"):
        (root / skipped).mkdir(parents=True)
        (root / skipped / "t.py").write_text("x = 1\n")

    got = default_corpus_files(max_bytes=None, stdlib_dir=str(root))
    assert got == [str(root / "a.py"), str(root / "pkg" / "b.py"), str(root / "zz.py")]
    # Greedy cap: pkg/b.py (10 bytes) does not fit after a.py (6), zz.py (2) still does.
    assert default_corpus_files(max_bytes=9, stdlib_dir=str(root)) == [
        str(root / "a.py"),
        str(root / "zz.py"),
    ]
    assert default_corpus_files(max_bytes=1, stdlib_dir=str(root)) == []


# ------------------------------------------------------------------------------ tokenizer


def test_tokenizer_is_megatron_tokenizer_and_round_trips(corpus):
    record, _ = corpus
    tok = CorpusTokenizer(record.tokenizer_path)
    assert isinstance(tok, MegatronTokenizerBase)
    assert tok.vocab_size == record.vocab_size == 512
    assert (tok.eod, tok.pad) == (0, 1)
    assert tok.vocab[EOD_TOKEN] == tok.eod and tok.inv_vocab[tok.eod] == EOD_TOKEN

    text = "déjà vu 🐍\tx = {'k': [1, 2]}\r\n<|endoftext|>  trailing  "
    ids = tok.tokenize(text)
    assert tok.eod not in ids and tok.pad not in ids  # literal special tokens stay text
    assert max(ids) < tok.vocab_size
    assert tok.detokenize(ids) == text
    assert tok.detokenize(numpy.array(ids + [tok.eod])) == text + EOD_TOKEN

    json.dumps(tok.unique_identifiers)  # megatron-core serialises it into its cache key
    clone = pickle.loads(pickle.dumps(tok))  # DataLoader workers may pickle the config
    assert clone.tokenize(text) == ids and clone.eod == tok.eod


# ------------------------------------------------------------------------------ prepare


def test_prepare_writes_megatron_indexed_dataset(corpus):
    record, files = corpus
    assert not record.skipped
    assert os.path.dirname(record.tokenizer_path) == os.path.dirname(record.prefix)
    assert os.path.basename(record.tokenizer_path) == "tokenizer.json"

    ds = IndexedDataset(record.prefix)
    tok = CorpusTokenizer(record.tokenizer_path)
    assert ds.index.dtype == DType.optimal_dtype(512) == numpy.uint16
    assert len(ds) == len(files) == record.num_documents
    # One sequence per document, as preprocess_data.py writes without sentence splitting.
    assert ds.document_indices.tolist() == list(range(len(files) + 1))
    assert int(ds.sequence_lengths.sum()) == record.num_tokens
    assert os.path.getsize(record.bin_path) == 2 * record.num_tokens

    for i, path in enumerate(files):
        doc = ds[i]
        assert doc[-1] == tok.eod
        assert tok.eod not in doc[:-1]
        with open(path, "rb") as f:
            assert tok.detokenize(doc[:-1]) == f.read().decode("utf-8")


def test_prepare_is_idempotent_and_rebuilds_on_change(tmp_path):
    texts = [open(f, encoding="utf-8").read() for f in default_corpus_files(max_bytes=40_000)]
    files = _write_docs(tmp_path / "src", texts)
    prefix = str(tmp_path / "out" / "corpus")
    first = prepare_corpus(prefix, files=files, vocab_size=300)
    watched = [first.bin_path, first.idx_path, first.tokenizer_path, first.manifest_path]
    mtimes = [os.stat(p).st_mtime_ns for p in watched]

    again = prepare_corpus(prefix, files=files, vocab_size=300)
    assert again.skipped
    assert [os.stat(p).st_mtime_ns for p in watched] == mtimes
    assert (again.num_tokens, again.num_documents) == (first.num_tokens, first.num_documents)

    bigger = prepare_corpus(prefix, files=files, vocab_size=400)
    assert not bigger.skipped
    assert CorpusTokenizer(bigger.tokenizer_path).vocab_size == 400
    assert bigger.num_tokens < first.num_tokens  # more merges, fewer tokens
    assert os.stat(bigger.bin_path).st_mtime_ns != mtimes[0]
    assert json.load(open(bigger.manifest_path))["settings"]["requested_vocab_size"] == 400

    with open(files[0], "a", encoding="utf-8") as f:
        f.write("print('changed')\n")
    changed = prepare_corpus(prefix, files=files, vocab_size=400)
    assert not changed.skipped and changed.num_tokens > bigger.num_tokens
    assert prepare_corpus(prefix, files=files, vocab_size=400).skipped


def test_prepare_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        prepare_corpus(str(tmp_path / "x"), files=[str(tmp_path / "nope.txt")])
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="bad.txt is not valid UTF-8"):
        prepare_corpus(str(tmp_path / "x"), files=[str(bad)], vocab_size=300)
    with pytest.raises(ValueError, match="empty corpus"):
        prepare_corpus(str(tmp_path / "x"), files=[])
    with pytest.raises(ValueError, match="vocab_size"):
        prepare_corpus(str(tmp_path / "x"), files=[str(bad)], vocab_size=100)


def test_second_corpus_in_same_directory_must_share_tokenizer(tmp_path):
    a = _write_docs(tmp_path / "a", ["alpha beta gamma\n" * 30] * 3)
    b = _write_docs(tmp_path / "b", ["delta epsilon\n" * 30] * 3)
    first = prepare_corpus(str(tmp_path / "out" / "a"), files=a, vocab_size=300)
    with pytest.raises(FileExistsError, match="own directory"):
        prepare_corpus(str(tmp_path / "out" / "b"), files=b, vocab_size=300)
    second = prepare_corpus(
        str(tmp_path / "out" / "b"), files=b, tokenizer_path=first.tokenizer_path
    )
    assert second.tokenizer_path == first.tokenizer_path
    assert prepare_corpus(str(tmp_path / "out" / "a"), files=a, vocab_size=300).skipped


def test_cli(tmp_path, capsys):
    src = tmp_path / "src"
    _write_docs(src, ["one two three\n" * 10, "four five\n" * 10])
    (src / "skip.bin").write_bytes(b"\xff\xfe\x00")
    prefix = tmp_path / "cli" / "mine"
    argv = ["--output-prefix", str(prefix), "--input", str(src), "--vocab-size", "300"]
    assert data.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 documents" in out and f"--data-path {prefix}" in out
    assert len(IndexedDataset(str(prefix))) == 2
    assert data.main(argv) == 0
    assert "up to date" in capsys.readouterr().out


# ------------------------------------------------------------------------------ datasets


def _sample_windows(ds):
    """Expected (seq+1)-token windows of a GPTDataset, read from the raw .bin stream."""
    raw = ds.dataset
    stream = numpy.concatenate([raw[int(d)] for d in ds.document_index]).astype(numpy.int64)
    lengths = [raw.sequence_lengths[int(d)] for d in ds.document_index]
    starts = numpy.concatenate([[0], numpy.cumsum(lengths)])
    for idx in range(len(ds)):
        j = int(ds.shuffle_index[idx])
        doc_pos, offset = (int(v) for v in ds.sample_index[j])
        begin = starts[doc_pos] + offset
        yield idx, stream[begin : begin + ds.config.sequence_length + 1]


def test_gpt_dataset_samples(corpus, tmp_path):
    record, _ = corpus
    tok = CorpusTokenizer(record.tokenizer_path)
    train, valid = build_gpt_datasets(
        record.prefix, tok, SEQ, 200, 20, seed=1234, split="80,20,0", cache_dir=tmp_path / "c"
    )
    assert isinstance(train, GPTDataset) and isinstance(valid, GPTDataset)
    assert len(train) >= 200 and len(valid) >= 20

    sample = train[0]
    for key in ("tokens", "labels", "position_ids"):
        assert sample[key].shape == (SEQ,) and sample[key].dtype == torch.int64
    assert sample["loss_mask"].shape == (SEQ,) and sample["loss_mask"].dtype == torch.float32
    assert sample["attention_mask"].shape == (1, SEQ, SEQ)
    assert torch.equal(sample["position_ids"], torch.arange(SEQ))
    assert torch.equal(sample["loss_mask"], torch.ones(SEQ))
    assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])

    checked = 0
    for idx, window in _sample_windows(train):
        if idx >= 50:
            break
        s = train[idx]
        assert torch.equal(s["tokens"], torch.from_numpy(window[:-1]))
        assert torch.equal(s["labels"], torch.from_numpy(window[1:]))
        checked += 1
    assert checked == 50

    # Disjoint document ranges: 80% of the documents for train, the rest for valid.
    n = record.num_documents
    train_docs = set(map(int, train.document_index))
    valid_docs = set(map(int, valid.document_index))
    assert not train_docs & valid_docs
    assert train_docs == set(range(round(0.8 * n)))
    assert valid_docs == set(range(round(0.8 * n), n))

    # Same seed, same samples (rebuilt from scratch in a fresh cache); other seed differs.
    again, _ = build_gpt_datasets(
        record.prefix, tok, SEQ, 200, 20, seed=1234, split="80,20,0", cache_dir=tmp_path / "c2"
    )
    other, _ = build_gpt_datasets(
        record.prefix, tok, SEQ, 200, 20, seed=99, split="80,20,0", cache_dir=tmp_path / "c3"
    )
    same = [torch.equal(train[i]["tokens"], again[i]["tokens"]) for i in range(20)]
    diff = [torch.equal(train[i]["tokens"], other[i]["tokens"]) for i in range(20)]
    assert all(same) and not all(diff)
    # The cache lives where we asked, never in the package.
    assert any(p.endswith(".npy") for p in os.listdir(tmp_path / "c"))
    assert not os.path.exists(os.path.join(os.path.dirname(data.__file__), "index_cache"))


def test_gpt_dataset_defaults_cache_next_to_data_and_loads_tokenizer(corpus):
    record, _ = corpus
    train, valid = build_gpt_datasets(record.prefix, None, SEQ, 10, 2, seed=5, split="80,20,0")
    assert valid is not None and train.config.tokenizer.eod == 0
    cache = os.path.join(os.path.dirname(record.prefix), "index_cache")
    assert any(name.endswith("GPTDataset-train-shuffle_index.npy") for name in os.listdir(cache))


def test_weighted_blend_without_distributed(corpus, tmp_path):
    record, _ = corpus
    other_files = _write_docs(tmp_path / "src", [f"value_{i} = {i} * 3\n" * 40 for i in range(40)])
    other = prepare_corpus(
        str(tmp_path / "other" / "o"), files=other_files, tokenizer_path=record.tokenizer_path
    )
    train, valid = build_gpt_datasets(
        ["0.75", record.prefix, "0.25", other.prefix], record.tokenizer_path, SEQ, 400, 40, seed=3,
        split="80,20,0", cache_dir=tmp_path / "c",
    )
    assert not torch.distributed.is_initialized()
    assert isinstance(train, BlendedDataset) and len(train) == 400 and len(valid) == 40
    ids = numpy.array([int(train[i]["dataset_id"]) for i in range(len(train))])
    assert abs((ids == 0).mean() - 0.75) < 0.01
    tok = CorpusTokenizer(record.tokenizer_path)
    from_other = next(i for i in range(len(train)) if ids[i] == 1)
    assert "value_" in tok.detokenize(train[from_other]["tokens"])


def test_blending_corpora_with_different_tokenizers_is_refused(corpus, tmp_path):
    record, _ = corpus
    other_files = _write_docs(tmp_path / "src", [f"value_{i} = {i} * 3\n" * 40 for i in range(40)])
    other = prepare_corpus(str(tmp_path / "other" / "o"), files=other_files, vocab_size=300)
    with pytest.raises(ValueError, match="different tokenizers") as info:
        build_gpt_datasets(["0.5", record.prefix, "0.5", other.prefix], record.tokenizer_path,
                           SEQ, 100, 10, seed=3, split="80,20,0", cache_dir=tmp_path / "c")
    assert "--tokenizer-model" in str(info.value)


def test_missing_data_path_is_a_clear_error(corpus, tmp_path):
    record, _ = corpus
    missing = str(tmp_path / "nothing" / "here")
    with pytest.raises(FileNotFoundError) as info:
        build_gpt_datasets(missing, record.tokenizer_path, SEQ, 10, 1, seed=1)
    message = str(info.value)
    assert missing + ".bin" in message and missing + ".idx" in message
    assert f"python examples/prepare_data.py --output-prefix {missing}" in message
    with pytest.raises(FileNotFoundError, match=r"here\.bin"):
        build_gpt_datasets(
            ["1", record.prefix, "1", missing], record.tokenizer_path, SEQ, 10, 1, seed=1
        )


@pytest.mark.timeout(60)  # megatron-core itself would loop forever here
def test_split_without_documents_raises_instead_of_hanging(tmp_path):
    files = _write_docs(tmp_path / "src", ["tiny doc number one\n", "tiny doc two\n", "three\n"])
    rec = prepare_corpus(str(tmp_path / "o" / "tiny"), files=files, vocab_size=300)
    with pytest.raises(ValueError, match="valid split .* without documents"):
        build_gpt_datasets(rec.prefix, rec.tokenizer_path, 8, 10, 2, seed=1, split="98,2,0")


_WORKER = textwrap.dedent(
    """
    import json, sys, warnings
    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    rank, prefix, tok, cache, out = int(sys.argv[1]), *sys.argv[2:6]
    dist.init_process_group(
        "gloo", init_method="file://" + cache + ".store", rank=rank, world_size=2
    )
    from gpt_recipe.data import build_gpt_datasets
    train, valid = build_gpt_datasets(
        prefix, tok, 32, 100, 10, seed=11, split="80,20,0", cache_dir=cache
    )
    blend, _ = build_gpt_datasets(["0.5", prefix, "0.5", prefix], tok, 32, 100, 10, seed=11,
                                  split="80,20,0", cache_dir=cache)
    result = {"train": [train[i]["tokens"].tolist() for i in range(5)],
              "valid": valid[0]["tokens"].tolist(),
              "blend": [blend[i]["tokens"].tolist() for i in range(5)]}
    dist.barrier()
    dist.destroy_process_group()
    json.dump(result, open(out, "w"))
    """
)


def test_torch_distributed_gloo_two_ranks(corpus, tmp_path):
    record, _ = corpus
    cache = str(tmp_path / "cache")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO_ROOT, os.path.join(REPO_ROOT, "examples"), os.environ.get("PYTHONPATH", "")]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(rank), record.prefix, record.tokenizer_path, cache,
             str(tmp_path / f"rank{rank}.json")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]
    for p in procs:
        output, _ = p.communicate(timeout=120)
        assert p.returncode == 0, output[-3000:]
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in range(2))
    assert r0 == r1
    train, valid = build_gpt_datasets(
        record.prefix, record.tokenizer_path, 32, 100, 10, seed=11, split="80,20,0", cache_dir=cache
    )
    assert r0["train"] == [train[i]["tokens"].tolist() for i in range(5)]
    assert r0["valid"] == valid[0]["tokens"].tolist()


def test_rewritten_data_does_not_reuse_stale_index_cache(corpus, tmp_path):
    record, _ = corpus
    src = tmp_path / "src"
    files = _write_docs(src, [f"first_{i} = {i}\n" * 30 for i in range(10)])
    prefix = str(tmp_path / "d" / "x")
    prepare_corpus(prefix, files=files, tokenizer_path=record.tokenizer_path)
    before, _ = build_gpt_datasets(
        prefix, record.tokenizer_path, 16, 50, 5, seed=2, split="80,20,0"
    )
    before_len = len(before)

    # Same tokenizer (same cache key in megatron-core), different data under the same prefix.
    files = _write_docs(src, [f"second_value_{i} = {i} + {i}\n" * 60 for i in range(10)])
    assert not prepare_corpus(prefix, files=files, tokenizer_path=record.tokenizer_path).skipped
    after, _ = build_gpt_datasets(
        prefix, record.tokenizer_path, 16, 50, 5, seed=2, split="80,20,0"
    )
    assert len(after) > before_len
    for idx, window in _sample_windows(after):
        assert torch.equal(after[idx]["tokens"], torch.from_numpy(window[:-1]))


def test_prepare_refuses_a_directory_prefix_and_a_foreign_tokenizer(tmp_path):
    files = _write_docs(tmp_path / "src", [f"x_{i} = {i}\n" * 30 for i in range(30)])
    with pytest.raises(ValueError, match="ends with a separator"):
        prepare_corpus(str(tmp_path / "out") + "/", files=files, vocab_size=300)
    (tmp_path / "mine").mkdir()
    foreign = tmp_path / "mine" / "tokenizer.json"
    foreign.write_text("{}")  # the user's own file, written by nothing here
    with pytest.raises(FileExistsError, match="--tokenizer-model"):
        prepare_corpus(str(tmp_path / "mine" / "c"), files=files, vocab_size=300)
    assert foreign.read_text() == "{}"  # untouched
    prepare_corpus(str(tmp_path / "mine" / "c"), files=files, vocab_size=300, force=True)
    assert foreign.read_text() != "{}"


def test_data_read_with_another_tokenizer_is_refused(corpus, tmp_path):
    record, _ = corpus
    files = _write_docs(tmp_path / "src", [f"y_{i} = {i}\n" * 30 for i in range(30)])
    other = prepare_corpus(str(tmp_path / "other" / "o"), files=files, vocab_size=300)
    with pytest.raises(ValueError, match="was tokenized with") as info:
        build_gpt_datasets(record.prefix, other.tokenizer_path, SEQ, 10, 2, seed=1,
                           cache_dir=tmp_path / "c")
    assert "--tokenizer-model" in str(info.value)
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="is not a tokenizers tokenizer.json"):
        CorpusTokenizer(bad)


def test_an_interrupted_preparation_is_redone_not_wedged(tmp_path, monkeypatch):
    files = _write_docs(tmp_path / "src", [f"value_{i} = {i}\n" * 40 for i in range(30)])
    prefix = str(tmp_path / "out" / "corpus")

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C once the tokenizer is trained

    with monkeypatch.context() as m:
        m.setattr(data.IndexedDatasetBuilder, "add_document", interrupted)
        with pytest.raises(KeyboardInterrupt):
            prepare_corpus(prefix, files=files, vocab_size=300)
    left = sorted(os.listdir(tmp_path / "out"))
    assert "corpus.manifest.json" not in left
    record = prepare_corpus(prefix, files=files, vocab_size=300)  # the next run redoes it
    assert not record.skipped and record.num_documents == 30
    assert sorted(os.listdir(tmp_path / "out")) == [
        "corpus.bin", "corpus.idx", "corpus.manifest.json", "tokenizer.json"]


def _copy_prefix(record, directory):
    import shutil

    directory.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(record.prefix + suffix, str(directory / "d") + suffix)
    return str(directory / "d")


def test_data_files_that_do_not_belong_together_are_refused_by_name(corpus, tmp_path):
    record, _ = corpus
    truncated = _copy_prefix(record, tmp_path / "t")
    with open(truncated + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(truncated + ".bin") - 6)
    with pytest.raises(ValueError, match=r"d\.idx describes .* bytes of tokens but .*d\.bin holds"):
        build_gpt_datasets(truncated, record.tokenizer_path, SEQ, 10, 2, seed=1)
    mixed = _copy_prefix(record, tmp_path / "m")  # a small index over a bigger data file
    small = prepare_corpus(str(tmp_path / "s" / "s"), files=_write_docs(tmp_path / "sd", ["a b\n"] * 3),
                           tokenizer_path=record.tokenizer_path)
    import shutil

    shutil.copy(small.prefix + ".idx", mixed + ".idx")
    with pytest.raises(ValueError, match="does not belong together"):
        build_gpt_datasets(mixed, record.tokenizer_path, SEQ, 10, 2, seed=1)
    empty = _copy_prefix(record, tmp_path / "e")
    open(empty + ".bin", "wb").close()
    with pytest.raises(ValueError, match=r"e/d\.bin is empty"):
        build_gpt_datasets(empty, record.tokenizer_path, SEQ, 10, 2, seed=1)


def test_a_tokenizer_smaller_than_the_data_is_refused(corpus, tmp_path):
    record, files = corpus
    bare = _copy_prefix(record, tmp_path / "bare")  # no manifest, as Megatron-LM's own data
    small = prepare_corpus(str(tmp_path / "tok" / "x"), files=files[:3], vocab_size=300)
    with pytest.raises(ValueError, match=r"holds token id \d+, but the tokenizer knows 300 tokens"):
        build_gpt_datasets(bare, small.tokenizer_path, SEQ, 10, 2, seed=1)


def test_the_data_tool_lists_the_files_it_skips(tmp_path, capsys):
    mixed = tmp_path / "mixed"
    _write_docs(mixed, ["good text\n" * 20])
    (mixed / "blob.bin").write_bytes(b"\xff\xfe\x00binary")
    (mixed / "empty.txt").write_text("")
    assert data.main(["--output-prefix", str(tmp_path / "o" / "o"), "--input", str(mixed),
                      "--vocab-size", "300"]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 file(s) that hold no UTF-8 text" in err and "blob.bin (not UTF-8)" in err
    assert "empty.txt (empty)" in err  # an empty file is no document
    only = tmp_path / "only"
    only.mkdir()
    (only / "a.bin").write_bytes(b"\xff\xfe")
    with pytest.raises(SystemExit):
        data.main(["--output-prefix", str(tmp_path / "p" / "p"), "--input", str(only)])
    assert "no UTF-8 text files under" in capsys.readouterr().err
