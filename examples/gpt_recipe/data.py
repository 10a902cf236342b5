"""Real text data for tiny GPT recipes, through megatron-core's own data path.

The pipeline has three steps, all offline and all on CPU:

1. **Corpus** -- :func:`default_corpus_files` picks the ``.py`` source files of the
   running Python's standard library (no download, ever).  Any other UTF-8 text
   files can be used instead.  One file is one document.
2. **Preparation** -- :func:`prepare_corpus` trains a byte-level BPE tokenizer
   (Hugging Face ``tokenizers``) on the corpus, tokenizes every document, appends
   the end-of-document token and writes Megatron's indexed dataset format
   (``<prefix>.bin`` / ``<prefix>.idx``) with megatron-core's own
   :class:`~megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`.  The
   result is interchangeable with the output of Megatron-LM's
   ``tools/preprocess_data.py``, so an existing ``--data-path`` works the same.
3. **Datasets** -- :func:`build_gpt_datasets` builds the train/valid
   :class:`~megatron.core.datasets.gpt_dataset.GPTDataset` splits (optionally
   blended) through megatron-core's
   :class:`~megatron.core.datasets.blended_megatron_dataset_builder.BlendedMegatronDatasetBuilder`,
   with or without ``torch.distributed`` initialised.

Command line::

    python examples/prepare_data.py --output-prefix data/stdlib
    python examples/prepare_data.py --output-prefix data/mine --input notes/ --vocab-size 8192
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import glob
import hashlib
import json
import logging
import os
import sys
import sysconfig
import time
import warnings
from collections import OrderedDict
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy
import torch

with warnings.catch_warnings():
    # megatron-core announces at import that Apex / Transformer Engine are absent
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import (
        DType,
        IndexedDataset,
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )
    from megatron.core.datasets.utils import get_blend_from_list
    from megatron.core.tokenizers import MegatronTokenizerBase

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_VOCAB_SIZE",
    "EOD_TOKEN",
    "PAD_TOKEN",
    "CorpusTokenizer",
    "PreparedCorpus",
    "build_gpt_datasets",
    "default_corpus_files",
    "main",
    "prepare_corpus",
    "tokenizer_path_for_prefix",
]

EOD_TOKEN = "<|endoftext|>"
"""Special token appended to every document (megatron-core's ``tokenizer.eod``)."""

PAD_TOKEN = "<|pad|>"
"""Special token used for padding (megatron-core's ``tokenizer.pad``); never in the data."""

from . import DEFAULT_MAX_BYTES, DEFAULT_VOCAB_SIZE  # noqa: E402 (defined without imports)

TOKENIZER_FILENAME = "tokenizer.json"
_MANIFEST_SUFFIX = ".manifest.json"
_CACHE_DIRNAME = "index_cache"
_FORMAT_VERSION = 1
from . import DATA_CLI as _CLI  # noqa: E402

# Directory names never descended into when collecting the stdlib corpus.  Test suites
# (``test``, ``tests``, ``idle_test``, e.g. ``lib2to3/tests``, ``ctypes/test``) contain
# deliberately odd files (bad encodings, huge generated data) and third-party packages are
# not the standard library.
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


def default_corpus_files(
    max_bytes: Optional[int] = DEFAULT_MAX_BYTES, *, stdlib_dir: Optional[str] = None
) -> List[str]:
    """Return the embedded default corpus: ``.py`` files of the Python standard library.

    Files are collected under ``sysconfig.get_paths()["stdlib"]`` (or ``stdlib_dir``) and
    taken in sorted order of their ``/``-separated relative paths, so the result is
    deterministic for a given Python installation.  Directories named ``site-packages``,
    ``dist-packages``, ``test``, ``tests``, ``idle_test`` or ``__pycache__`` are skipped at
    any depth, as are empty files and files that are not valid UTF-8.

    The cap is greedy: walking the sorted list, a file is taken if the running total plus
    its size stays within ``max_bytes``; a file that does not fit is skipped and later
    (smaller) files may still be taken.

    Args:
        max_bytes: cap on the total size of the returned files, in bytes; ``None`` for no cap.
        stdlib_dir: directory to collect from instead of the running Python's stdlib.

    Returns:
        Absolute paths of the selected files, in sorted relative-path order.  Empty if no
        file fits.

    Raises:
        FileNotFoundError: if the standard library directory does not exist.
        ValueError: if ``max_bytes`` is negative.
    """
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
    root = os.path.abspath(stdlib_dir or sysconfig.get_paths()["stdlib"])
    if not os.path.isdir(root):
        raise FileNotFoundError(f"standard library directory not found: {root}")

    candidates = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                candidates.append((rel, path))
    candidates.sort()

    selected, total = [], 0
    for _, path in candidates:
        try:
            size = os.path.getsize(path)
        except OSError:
            continue
        if size == 0 or (max_bytes is not None and total + size > max_bytes):
            continue
        if _read_utf8(path, strict=False) is None:
            continue
        selected.append(path)
        total += size
    return selected


def _read_utf8(path: str, strict: bool = True) -> Optional[str]:
    """Read a file as UTF-8 text exactly (no newline translation).

    Returns ``None`` for undecodable files when ``strict`` is false, else raises
    ``ValueError`` naming the file.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        if not strict:
            return None
        raise ValueError(f"{path} is not valid UTF-8 text ({err})") from err


def _expand_inputs(inputs: Sequence[str], suffixes: Optional[Sequence[str]] = None,
                   skipped: Optional[List[str]] = None) -> List[str]:
    """Expand files and directories into a list of files (CLI helper).

    Files are kept as given, in the given order.  A directory contributes every regular file
    below it (hidden entries and ``__pycache__`` skipped) whose name ends with one of
    ``suffixes`` (all files when ``None``) and that is valid UTF-8, in sorted relative-path
    order; the files left out (not UTF-8, or empty) are appended to ``skipped``.

    Raises:
        FileNotFoundError: if an input does not exist.
    """
    out: List[str] = []
    for item in inputs:
        item = os.path.abspath(item)
        if os.path.isfile(item):
            out.append(item)
        elif os.path.isdir(item):
            found = []
            for dirpath, dirnames, filenames in os.walk(item):
                dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
                for name in filenames:
                    if name.startswith(".") or (
                        suffixes is not None and not name.endswith(tuple(suffixes))
                    ):
                        continue
                    path = os.path.join(dirpath, name)
                    if not os.path.isfile(path):
                        continue
                    text = _read_utf8(path, strict=False)
                    if not text:  # not UTF-8, or empty: no document
                        if skipped is not None:
                            skipped.append(f"{path} ({'empty' if text == '' else 'not UTF-8'})")
                        continue
                    found.append((os.path.relpath(path, item).replace(os.sep, "/"), path))
            out.extend(path for _, path in sorted(found))
        else:
            raise FileNotFoundError(f"input not found: {item}")
    return out


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CorpusTokenizer(MegatronTokenizerBase):
    """A Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``) in megatron-core's shape.

    megatron-core 0.16.1 types ``GPTDatasetConfig.tokenizer`` as
    :class:`megatron.core.tokenizers.MegatronTokenizerBase` (the older
    ``megatron.core.datasets.megatron_tokenizer.MegatronLegacyTokenizer`` is deprecated), so
    this class subclasses it.  What the GPT dataset classes use from it: ``eod`` (loss/position
    handling), ``pad`` (padding id, masked out of the loss), ``vocab_size`` (token dtype) and
    ``unique_identifiers`` (part of the index-cache key).

    Any ``tokenizer.json`` containing :data:`EOD_TOKEN` can be loaded; the ones written by
    :func:`prepare_corpus` are byte-level BPE with ``<|endoftext|>`` (id 0) and ``<|pad|>``
    (id 1), and round-trip any text exactly: ``detokenize(tokenize(s)) == s``.  Special-token
    strings that occur literally in text are encoded as ordinary text, so ``eod`` only ever
    appears where :func:`prepare_corpus` put it.

    Args:
        path: path to a ``tokenizer.json``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the tokenizer has no :data:`EOD_TOKEN`.
    """

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        path = os.path.abspath(os.fspath(path))
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"tokenizer file not found: {path}; create it with "
                f"`{_CLI} --output-prefix <dir>/<name>` (it is written as "
                f"<dir>/{TOKENIZER_FILENAME})"
            )
        super().__init__(path, {})
        with open(path, "r", encoding="utf-8") as f:
            self._init_from_json(path, f.read())

    def _init_from_json(self, path: str, json_text: str) -> None:
        from tokenizers import Tokenizer

        self.path = path
        self._json = json_text
        try:
            self._tokenizer = Tokenizer.from_str(json_text)
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path} is not a tokenizers tokenizer.json: {err}") from None
        # A runtime flag, neither saved in tokenizer.json nor pickled: set it on every load.
        self._tokenizer.encode_special_tokens = True
        eod = self._tokenizer.token_to_id(EOD_TOKEN)
        if eod is None:
            raise ValueError(f"tokenizer {path} has no end-of-document token {EOD_TOKEN!r}")
        self._eod = int(eod)
        pad = self._tokenizer.token_to_id(PAD_TOKEN)
        self._pad = self._eod if pad is None else int(pad)
        self._sha256 = hashlib.sha256(json_text.encode("utf-8")).hexdigest()

    def __getstate__(self) -> dict:
        return {"path": self.path, "json": self._json}

    def __setstate__(self, state: dict) -> None:
        self._init_from_json(state["path"], state["json"])

    def __repr__(self) -> str:
        return f"CorpusTokenizer({self.path!r}, vocab_size={self.vocab_size}, eod={self.eod})"

    @classmethod
    def for_data_prefix(cls, data_prefix: Union[str, os.PathLike]) -> "CorpusTokenizer":
        """Load the tokenizer that :func:`prepare_corpus` used for ``data_prefix``.

        Raises:
            FileNotFoundError: if no tokenizer is found for the prefix.
        """
        return cls(tokenizer_path_for_prefix(data_prefix))

    def tokenize(self, text: str) -> List[int]:
        """Encode text into token ids (no special tokens added; ``eod`` is not appended)."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Encode several texts in parallel; same result as ``[tokenize(t) for t in texts]``."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def detokenize(self, ids: Iterable[int]) -> str:
        """Decode token ids (list, numpy array or tensor) into text; special tokens are kept."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def apply_chat_template(self, *args, **kwargs):
        """Not supported: this is a plain-text pretraining tokenizer.

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError("CorpusTokenizer has no chat template")

    @property
    def vocab(self) -> dict:
        """Mapping token string -> id, special tokens included."""
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> dict:
        """Mapping id -> token string, special tokens included."""
        return {i: t for t, i in self.vocab.items()}

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (ids are ``0 .. vocab_size - 1``)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        """Id of :data:`EOD_TOKEN`, appended to every document."""
        return self._eod

    @property
    def eos(self) -> int:
        """Alias of :attr:`eod`."""
        return self._eod

    @property
    def pad(self) -> int:
        """Id of :data:`PAD_TOKEN`; falls back to :attr:`eod` for tokenizers without one (then
        megatron-core warns and pads with -1 instead, which it masks out of the loss)."""
        return self._pad

    @property
    def unique_identifiers(self) -> "OrderedDict[str, str]":
        """What identifies this tokenizer in megatron-core's dataset index-cache key.

        Includes the SHA-256 of the tokenizer JSON, so re-training the tokenizer invalidates
        cached sample indices built for the old token stream.
        """
        return OrderedDict(
            [
                ("class", type(self).__name__),
                ("tokenizer_path", self.path),
                ("sha256", self._sha256),
            ]
        )


def _train_tokenizer(texts: Iterator[str], num_texts: int, vocab_size: int):
    """Train a byte-level BPE tokenizer; returns a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # No normalizer: text must round-trip byte for byte.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=num_texts)
    return tok


def tokenizer_path_for_prefix(data_prefix: Union[str, os.PathLike]) -> str:
    """Path of the tokenizer used for a prepared data prefix.

    Read from the prefix's manifest (``<prefix>.manifest.json``) when present, otherwise
    ``<dirname(prefix)>/tokenizer.json``.  The file is not required to exist.
    """
    prefix = os.path.abspath(os.fspath(data_prefix))
    manifest = _load_manifest(prefix + _MANIFEST_SUFFIX)
    if manifest and manifest.get("tokenizer", {}).get("path"):
        return manifest["tokenizer"]["path"]
    return os.path.join(os.path.dirname(prefix), TOKENIZER_FILENAME)


# --------------------------------------------------------------------------------------------
# Preparation
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PreparedCorpus:
    """What :func:`prepare_corpus` wrote (or found up to date).

    Attributes:
        prefix: absolute data prefix; pass it as ``--data-path`` / ``data_path``.
        bin_path: ``<prefix>.bin``, the token ids (dtype ``dtype``).
        idx_path: ``<prefix>.idx``, Megatron's index (document boundaries).
        tokenizer_path: the ``tokenizer.json`` used.
        manifest_path: ``<prefix>.manifest.json``, the settings the files were built with.
        num_documents: documents written (one per input file).
        num_tokens: tokens written, end-of-document tokens included.
        num_bytes: bytes of source text read.
        vocab_size: tokenizer vocabulary size in tokens (can be below the requested size for a
            tiny corpus).
        dtype: numpy dtype name of the token ids in the ``.bin`` file.
        skipped: ``True`` if the files were already up to date and nothing was written.
        seconds: wall-clock time of the call.
    """

    prefix: str
    bin_path: str
    idx_path: str
    tokenizer_path: str
    manifest_path: str
    num_documents: int
    num_tokens: int
    num_bytes: int
    vocab_size: int
    dtype: str
    skipped: bool
    seconds: float


def _record(prefix: str, tok_path: str, manifest: dict, skipped: bool, t0: float) -> PreparedCorpus:
    """The :class:`PreparedCorpus` a manifest describes."""
    return PreparedCorpus(
        prefix=prefix,
        bin_path=get_bin_path(prefix),
        idx_path=get_idx_path(prefix),
        tokenizer_path=tok_path,
        manifest_path=prefix + _MANIFEST_SUFFIX,
        num_documents=manifest["num_documents"],
        num_tokens=manifest["num_tokens"],
        num_bytes=manifest["num_bytes"],
        vocab_size=manifest["tokenizer"]["vocab_size"],
        dtype=manifest["dtype"],
        skipped=skipped,
        seconds=time.perf_counter() - t0,
    )


def _load_manifest(path: str) -> Optional[dict]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _corpus_fingerprint(files: Sequence[str]) -> Tuple[str, int]:
    """SHA-256 over (path, content) of every file, and the total size in bytes."""
    digest, total = hashlib.sha256(), 0
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        total += len(data)
        digest.update(path.encode("utf-8", "surrogateescape") + b"\0")
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest(), total


def _cap_files(files: Sequence[str], max_bytes: Optional[int]) -> List[str]:
    if max_bytes is None:
        return list(files)
    out, total = [], 0
    for path in files:
        size = os.path.getsize(path)
        if total + size <= max_bytes:
            out.append(path)
            total += size
    return out


def _default_cache_dir(prefix: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), _CACHE_DIRNAME)


def _purge_index_cache(prefix: str) -> None:
    """Delete cached megatron-core sample indices built from ``prefix`` in its default cache.

    megatron-core keys its cache on the data path and settings, not on the data content, so
    indices built before the ``.bin``/``.idx`` files were rewritten would be silently reused.
    """
    cache_dir = _default_cache_dir(prefix)
    needle = json.dumps(prefix)
    for desc in glob.glob(os.path.join(cache_dir, "*-description.txt")):
        try:
            with open(desc, "r", encoding="utf-8") as f:
                if needle not in f.read():
                    continue
        except OSError:
            continue
        stem = desc[: -len("description.txt")]
        for path in glob.glob(glob.escape(stem) + "*"):
            with contextlib.suppress(OSError):
                os.remove(path)


def _check_tokenizer_not_shared(tokenizer_path: str, prefix: str, owned: bool, force: bool) -> None:
    """Refuse to retrain a tokenizer.json that another prepared prefix depends on, or one
    that no preparation here wrote (``owned``: this prefix's previous build wrote it)."""
    if not os.path.exists(tokenizer_path):
        return
    current = _sha256_file(tokenizer_path)
    pattern = os.path.join(glob.escape(os.path.dirname(tokenizer_path)), "*" + _MANIFEST_SUFFIX)
    for manifest_path in sorted(glob.glob(pattern)):
        other = manifest_path[: -len(_MANIFEST_SUFFIX)]
        if other == prefix:
            continue
        manifest = _load_manifest(manifest_path) or {}
        tok = manifest.get("tokenizer", {})
        if tok.get("path") == tokenizer_path and tok.get("sha256") == current:
            raise FileExistsError(
                f"{tokenizer_path} is the tokenizer of the prepared corpus {other}; training a "
                f"new one for {prefix} would break it. Put this corpus in its own directory, or "
                f"reuse the tokenizer with prepare_corpus(..., tokenizer_path="
                f"{tokenizer_path!r}) / `{_CLI} --tokenizer-model {tokenizer_path}`."
            )
    if not owned and not force:
        raise FileExistsError(
            f"{tokenizer_path} exists and was not written for {prefix}; training would replace "
            f"it. Reuse it with `{_CLI} --tokenizer-model {tokenizer_path}`, prepare into "
            f"another directory, or pass --force to replace it."
        )


def prepare_corpus(
    output_prefix: Union[str, os.PathLike],
    files: Optional[Sequence[Union[str, os.PathLike]]] = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_bytes: Optional[int] = None,
    *,
    tokenizer_path: Optional[Union[str, os.PathLike]] = None,
    force: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
) -> PreparedCorpus:
    """Tokenize a corpus into Megatron's indexed dataset format (``.bin`` / ``.idx``).

    Every file is one document: its UTF-8 text is tokenized and the end-of-document token
    (:data:`EOD_TOKEN`, ``tokenizer.eod``) appended.  Documents are written in the order of
    ``files`` with megatron-core's ``IndexedDatasetBuilder`` as one sequence per document,
    token dtype ``DType.optimal_dtype(vocab_size)`` (``uint16`` below 65500 tokens, else
    ``int32``) -- the same layout Megatron-LM's ``tools/preprocess_data.py`` produces for GPT
    with ``--append-eod``.

    Unless ``tokenizer_path`` is given, a byte-level BPE tokenizer with ``vocab_size`` tokens
    is first trained on the corpus and saved as ``<dirname(output_prefix)>/tokenizer.json``.
    Two corpora sharing a directory must share a tokenizer: prepare the second with
    ``tokenizer_path`` pointing at the first one's ``tokenizer.json`` (needed anyway to blend
    them).

    The call is idempotent: the settings and a fingerprint of the input (paths and contents)
    are stored in ``<prefix>.manifest.json``; if it matches and all files are present and
    intact, nothing is written and the returned record has ``skipped=True``.

    Args:
        output_prefix: path prefix of the output; directories are created as needed.
        files: UTF-8 text files, one document each; default: :func:`default_corpus_files`.
        vocab_size: size of the trained tokenizer's vocabulary in tokens, special tokens
            included (ignored when ``tokenizer_path`` is given).
        max_bytes: cap on the source text in bytes, applied greedily in file order (see
            :func:`default_corpus_files`); ``None`` means :data:`DEFAULT_MAX_BYTES` for the
            default corpus and no cap for explicit ``files``.
        tokenizer_path: reuse this existing ``tokenizer.json`` instead of training one.
        force: rebuild even if the output is up to date.
        progress: called as ``progress(files_tokenized, files)`` while tokenizing.

    Returns:
        A :class:`PreparedCorpus` record.

    Raises:
        FileNotFoundError: if an input file or ``tokenizer_path`` does not exist.
        FileExistsError: if training would overwrite a ``tokenizer.json`` that another prepared
            prefix in the same directory uses.
        ValueError: for an empty corpus, a file that is not valid UTF-8, or ``vocab_size``
            outside ``[258, 2**31)`` (256 byte tokens plus the two special tokens).
    """
    t0 = time.perf_counter()
    if os.fspath(output_prefix).endswith(("/", os.sep)):
        raise ValueError(
            f"output prefix {output_prefix!r} ends with a separator: give a file prefix such "
            f"as {os.path.join(os.fspath(output_prefix), 'corpus')!r} (writes corpus.bin/.idx)"
        )
    prefix = os.path.abspath(os.fspath(output_prefix))
    if not 258 <= int(vocab_size) < 2**31:
        raise ValueError(f"vocab_size must be in [258, 2**31), got {vocab_size}")
    vocab_size = int(vocab_size)

    if files is None:
        source = "stdlib"
        cap = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
        paths = default_corpus_files(cap)
    else:
        source = "files"
        cap = max_bytes
        paths = [os.path.abspath(os.fspath(p)) for p in files]
        for p in paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"input file not found: {p}")
        paths = _cap_files(paths, cap)
    if not paths:
        raise ValueError(
            "empty corpus: no input files" + (f" within max_bytes={cap}" if cap is not None else "")
        )

    if tokenizer_path is not None:
        tok_path = os.path.abspath(os.fspath(tokenizer_path))
        if not os.path.isfile(tok_path):
            raise FileNotFoundError(f"tokenizer file not found: {tok_path}")
        train = False
    else:
        tok_path = os.path.join(os.path.dirname(prefix), TOKENIZER_FILENAME)
        train = True

    bin_path, idx_path = get_bin_path(prefix), get_idx_path(prefix)
    manifest_path = prefix + _MANIFEST_SUFFIX
    fingerprint, num_bytes = _corpus_fingerprint(paths)
    settings = {
        "format_version": _FORMAT_VERSION,
        "corpus_sha256": fingerprint,
        "tokenizer_trained": train,
        "tokenizer_path": tok_path,
        "requested_vocab_size": vocab_size if train else None,
        "reused_tokenizer_sha256": None if train else _sha256_file(tok_path),
    }

    old = _load_manifest(manifest_path)
    if not force and old is not None and old.get("settings") == settings:
        try:
            intact = (
                _sha256_file(tok_path) == old["tokenizer"]["sha256"]
                and os.path.getsize(bin_path)
                == old["num_tokens"] * numpy.dtype(old["dtype"]).itemsize
                and os.path.isfile(idx_path)
            )
        except (OSError, KeyError, TypeError):
            intact = False
        if intact:
            return _record(prefix, tok_path, old, skipped=True, t0=t0)

    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(manifest_path)  # invalid until the rebuild completes
    marker = prefix + ".preparing"  # this prefix's build is under way (or was interrupted)
    _remove_temporaries(prefix)

    new_tok = tok_path
    if train:
        owned = (old is not None and old.get("tokenizer", {}).get("path") == tok_path) or (
            os.path.exists(marker))
        _check_tokenizer_not_shared(tok_path, prefix, owned, force)
        _atomic_write_text(marker, tok_path)
        texts = (_read_utf8(p) for p in paths)
        hf_tokenizer = _train_tokenizer(texts, len(paths), vocab_size)
        new_tok = f"{tok_path}.tmp{os.getpid()}"  # in place only once the data is written
        _atomic_write_text(new_tok, hf_tokenizer.to_str(pretty=True))
    tokenizer = CorpusTokenizer(new_tok)

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    tmp_prefix = f"{prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(get_bin_path(tmp_prefix), dtype=dtype)
    num_tokens = 0
    try:
        chunk = 64
        for start in range(0, len(paths), chunk):
            texts = [_read_utf8(p) for p in paths[start : start + chunk]]
            for ids in tokenizer.tokenize_batch(texts):
                doc = numpy.asarray(ids + [tokenizer.eod], dtype=numpy.int64)
                builder.add_document(doc, [doc.size])
                num_tokens += doc.size
            if progress is not None:
                progress(min(start + chunk, len(paths)), len(paths))
        builder.finalize(get_idx_path(tmp_prefix))
        os.replace(get_bin_path(tmp_prefix), bin_path)
        os.replace(get_idx_path(tmp_prefix), idx_path)
    finally:
        with contextlib.suppress(Exception):
            builder.data_file.close()
        for p in (get_bin_path(tmp_prefix), get_idx_path(tmp_prefix)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)

    if new_tok != tok_path:
        os.replace(new_tok, tok_path)
    _purge_index_cache(prefix)
    manifest = {
        "settings": settings,
        "source": source,
        "max_bytes": cap,
        "files": paths,
        "num_documents": len(paths),
        "num_tokens": num_tokens,
        "num_bytes": num_bytes,
        "dtype": numpy.dtype(dtype).name,
        "tokenizer": {
            "path": tok_path,
            "sha256": _sha256_file(tok_path),
            "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod,
            "pad": tokenizer.pad,
        },
    }
    _atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    with contextlib.suppress(FileNotFoundError):
        os.remove(marker)
    return _record(prefix, tok_path, manifest, skipped=False, t0=t0)


def _remove_temporaries(prefix: str) -> None:
    """What an interrupted preparation of ``prefix`` left (``*.tmp<pid>`` files)."""
    import re

    folder, base = os.path.split(prefix)
    pattern = re.compile(rf"^({re.escape(base)}|{re.escape(TOKENIZER_FILENAME)})\.tmp\d+(\.bin|\.idx)?$")
    for name in os.listdir(folder):
        if pattern.match(name):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


class _Builder(BlendedMegatronDatasetBuilder):
    """``BlendedMegatronDatasetBuilder`` that also works without ``torch.distributed``.

    megatron-core 0.16.1's ``BlendedDataset`` calls ``torch.distributed.get_rank()`` on an
    index-cache miss whenever ``path_to_cache`` is set, which raises if no process group is
    initialised.  Without one, blended indices (cheap to compute) are built in memory and not
    cached; everything else, ``GPTDataset`` indices included, is cached as usual.
    """

    @staticmethod
    def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
        if cls is BlendedDataset and not torch.distributed.is_initialized():
            config = copy.copy(args[-1])
            config.path_to_cache = None
            args = (*args[:-1], config)
            with _quiet_blended_cache_warning():
                return BlendedMegatronDatasetBuilder.build_generic_dataset(
                    cls, is_built_on_rank, synchronize_ranks, *args
                )
        return BlendedMegatronDatasetBuilder.build_generic_dataset(
            cls, is_built_on_rank, synchronize_ranks, *args
        )


@contextlib.contextmanager
def _quiet_blended_cache_warning():
    """Drop the "Cannot save the BlendedDataset indexes" warning we cause on purpose."""

    def _filter(record: logging.LogRecord) -> bool:
        return "because path_to_cache is None" not in record.getMessage()

    target = logging.getLogger("megatron.core.datasets.blended_dataset")
    target.addFilter(_filter)
    try:
        yield
    finally:
        target.removeFilter(_filter)


def _missing_data_error(prefix: str, missing: List[str]) -> FileNotFoundError:
    return FileNotFoundError(
        f"data path {prefix!r}: missing {' and '.join(missing)}. A data path is a prefix of a "
        f"<prefix>.bin/<prefix>.idx pair in Megatron's indexed format; create it with "
        f"`{_CLI} --output-prefix {prefix}` (stdlib corpus; add --input FILE_OR_DIR for your "
        f"own text) or Megatron-LM's tools/preprocess_data.py."
    )


def _parse_data_path(
    data_path: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
) -> Tuple[List[str], Optional[List[float]]]:
    if isinstance(data_path, (str, os.PathLike)):
        items = [os.fspath(data_path)]
    else:
        items = [os.fspath(x) for x in data_path]
    if not items:
        raise ValueError("data_path is empty")
    prefixes, weights = get_blend_from_list(items)
    if weights is not None:
        if any(w <= 0 for w in weights):
            raise ValueError(f"blend weights must be positive, got {weights}")
    prefixes = [os.path.abspath(p) for p in prefixes]
    for prefix in prefixes:
        missing = [p for p in (get_bin_path(prefix), get_idx_path(prefix)) if not os.path.isfile(p)]
        if missing:
            raise _missing_data_error(prefix, missing)
    return prefixes, weights


def _check_data_files(prefix: str, vocab_size: int) -> None:
    """Refuse a ``.bin``/``.idx`` pair that does not belong together, or token ids the
    tokenizer does not know, naming the files.

    Raises:
        ValueError: an empty file, an index whose token count x item size is not the data
            file's size, or a token id >= ``vocab_size``.
    """
    bin_path, idx_path = get_bin_path(prefix), get_idx_path(prefix)
    for path in (bin_path, idx_path):
        if os.path.getsize(path) == 0:
            raise ValueError(f"{path} is empty: prepare the data again")
    try:
        index = IndexedDataset(prefix, mmap=True)
    except Exception as err:  # megatron-core's own reader: a damaged index
        raise ValueError(f"{idx_path} cannot be read as Megatron's index ({err})") from err
    itemsize = numpy.dtype(index.index.dtype).itemsize
    expected = int(index.sequence_lengths.sum()) * itemsize
    actual = os.path.getsize(bin_path)
    if expected != actual:
        raise ValueError(
            f"{idx_path} describes {expected:,} bytes of tokens but {bin_path} holds {actual:,}: "
            "the pair does not belong together (truncated or mixed up); prepare the data again")
    largest = int(numpy.memmap(bin_path, dtype=index.index.dtype, mode="r").max())
    if largest >= vocab_size:
        raise ValueError(
            f"{bin_path} holds token id {largest}, but the tokenizer knows {vocab_size} tokens: "
            "give the tokenizer the data was prepared with (--tokenizer-model)")


def _check_same_tokenizer(prefixes: Sequence[str], tokenizer=None) -> None:
    """Refuse data whose token ids were made by another tokenizer than the one given, and
    blends of corpora prepared with different tokenizers.

    Prefixes without a manifest (e.g. Megatron-LM's own preprocessing) are not checked.
    """
    seen = {}
    given = getattr(tokenizer, "_sha256", None)
    for prefix in prefixes:
        manifest = _load_manifest(prefix + _MANIFEST_SUFFIX) or {}
        sha = manifest.get("tokenizer", {}).get("sha256")
        if sha is not None:
            seen.setdefault(sha, prefix)
            if given is not None and sha != given:
                raise ValueError(
                    f"{prefix} was tokenized with {manifest['tokenizer'].get('path')}, not with "
                    f"{tokenizer.path}: pass that tokenizer (--tokenizer-model) or prepare the "
                    f"data again with this one"
                )
    if len(seen) > 1:
        a, b = list(seen.values())[:2]
        raise ValueError(
            f"{a} and {b} were prepared with different tokenizers, so their token ids do not "
            f"mean the same thing: prepare one with the other's tokenizer "
            f"(`{_CLI} --tokenizer-model {tokenizer_path_for_prefix(a)} ...`) before blending"
        )


def build_gpt_datasets(
    data_path: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    tokenizer: Optional[Union[MegatronTokenizerBase, str, os.PathLike]],
    seq_length: int,
    train_samples: int,
    valid_samples: Optional[int],
    seed: int,
    split: str = "98,2,0",
    *,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = True,
    mmap: bool = True,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
) -> Tuple[torch.utils.data.Dataset, Optional[torch.utils.data.Dataset]]:
    """Build the train and valid GPT datasets with megatron-core's own builder.

    Uses ``BlendedMegatronDatasetBuilder`` + ``GPTDatasetConfig`` + ``GPTDataset`` exactly as
    Megatron-LM's ``--data-path``/``--split`` do: documents are split into train/valid/test
    ranges by ``split`` (disjoint document sets), shuffled with ``seed``, concatenated and cut
    into samples of ``seq_length + 1`` tokens; enough epochs are stacked to provide the
    requested number of samples.

    Each sample is a dict of tensors:

    * ``tokens``: ``[seq_length]`` int64 -- input ids;
    * ``labels``: ``[seq_length]`` int64 -- the same token stream shifted by one
      (``labels[i]`` is the token after ``tokens[i]``);
    * ``loss_mask``: ``[seq_length]`` float32 -- 1.0, 0.0 on padding (and on ``eod`` with
      ``eod_mask_loss``);
    * ``position_ids``: ``[seq_length]`` int64 -- ``0 .. seq_length-1`` (restarting after each
      ``eod`` with ``reset_position_ids``);
    * ``attention_mask``: ``[1, seq_length, seq_length]`` bool, ``True`` = masked out (only with
      ``create_attention_mask``);
    * ``dataset_id``: int, only for blended data.

    The datasets build on CPU with or without ``torch.distributed``.  When it is initialised
    (e.g. gloo), rank 0 builds and caches the indices first and the other ranks load them
    after a barrier, so ``cache_dir`` must be the same directory for all ranks.

    Args:
        data_path: a prefix of a ``.bin``/``.idx`` pair, or Megatron's list form: prefixes
            (``["a", "b"]``, weighted by size) or weights and prefixes
            (``["0.5", "a", "0.5", "b"]``).
        tokenizer: a :class:`CorpusTokenizer` (or any ``MegatronTokenizerBase`` with ``eod``,
            ``pad``, ``vocab_size`` and ``unique_identifiers``), a path to a
            ``tokenizer.json``, or ``None`` for the tokenizer prepared with the first prefix.
        seq_length: tokens per sample.
        train_samples: number of training samples to provide (at least).
        valid_samples: number of validation samples; ``None`` for exactly one epoch of the
            validation documents (single prefix or unweighted list only).
        seed: seed for document and sample shuffling; same seed, same samples.
        split: Megatron's train,valid,test weights, e.g. ``"98,2,0"``.
        cache_dir: where megatron-core caches its index arrays (``.npy``); default
            ``<dirname(first prefix)>/index_cache``.
        reset_position_ids, reset_attention_mask, eod_mask_loss: megatron-core's per-document
            options, off by default.
        create_attention_mask: include the dense ``attention_mask`` in samples.
        mmap: memory-map the ``.bin`` files (else read with file pointers).
        is_built_on_rank: megatron-core's "build on this rank" predicate; default: every rank.

    Returns:
        ``(train, valid)``: ``torch.utils.data.Dataset`` objects (``GPTDataset``, or
        ``BlendedDataset`` over ``GPTDataset``); ``valid`` is ``None`` if ``split`` gives it no
        weight.

    Raises:
        FileNotFoundError: if a prefix's ``.bin`` or ``.idx`` is missing (the message says how to
            create it), or the tokenizer cannot be found.
        ValueError: for bad sizes or weights, or if a split that should provide samples gets no
            documents (too few documents for ``split``).
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if train_samples < 1:
        raise ValueError(f"train_samples must be >= 1, got {train_samples}")
    if valid_samples is not None and valid_samples < 0:
        raise ValueError(f"valid_samples must be >= 0 or None, got {valid_samples}")

    prefixes, weights = _parse_data_path(data_path)
    _check_same_tokenizer(prefixes)
    if weights is not None and valid_samples is None:
        raise ValueError("valid_samples=None (one epoch) needs unweighted data_path")

    if tokenizer is None:
        tokenizer = CorpusTokenizer.for_data_prefix(prefixes[0])
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = CorpusTokenizer(tokenizer)
    _check_same_tokenizer(prefixes, tokenizer)
    for prefix in prefixes:
        _check_data_files(prefix, tokenizer.vocab_size)

    if cache_dir is None:
        cache_dir = _default_cache_dir(prefixes[0])
    cache_dir = os.path.abspath(os.fspath(cache_dir))
    config = GPTDatasetConfig(
        random_seed=int(seed),
        sequence_length=int(seq_length),
        blend=(prefixes, weights),
        split=split,
        path_to_cache=cache_dir,
        mmap_bin_files=mmap,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
    )

    # megatron-core loops forever when asked for samples from a split without documents
    # (zero tokens per epoch), so check the document ranges first.
    wanted = {0: train_samples, 1: valid_samples}
    for prefix in prefixes:
        num_docs = IndexedDataset(prefix, mmap=mmap).sequence_lengths.shape[0]
        for index, name in ((0, "train"), (1, "valid")):
            bookends = config.split_matrix[index]
            if bookends is None or wanted[index] == 0:
                continue
            beg = int(round(bookends[0] * float(num_docs)))
            end = int(round(bookends[1] * float(num_docs)))
            if end <= beg:
                raise ValueError(
                    f"--split {split} leaves the {name} split of {prefix} without documents "
                    f"({num_docs} documents in all): {split_advice(num_docs)}"
                )

    builder = _Builder(
        GPTDataset,
        [train_samples, valid_samples, 0],
        is_built_on_rank or (lambda: True),
        config,
    )
    train, valid, _ = builder.build()
    return train, valid


def corpus_size(prefix: str) -> Tuple[int, int]:
    """``(documents, tokens)`` of a prepared ``<prefix>.bin/.idx`` (read from the index)."""
    index = IndexedDataset(prefix, mmap=True)  # alive while its memory map is read
    return int(index.sequence_lengths.shape[0]), int(index.sequence_lengths.sum())


def documents_per_split(num_documents: int, split: str = "98,2,0") -> List[int]:
    """Documents Megatron gives each of the train/valid/test splits (its rounding of the
    normalised cumulative shares, ``megatron.core.datasets.utils``)."""
    shares = [float(x) for x in split.split(",")]
    total, bounds = sum(shares), [0.0]
    for share in shares:
        bounds.append(bounds[-1] + share / total)
    ends = [int(round(b * num_documents)) for b in bounds]
    return [b - a for a, b in zip(ends, ends[1:])]


def split_advice(num_documents: int) -> str:
    """What to change when a corpus is too small for its ``--split``."""
    if num_documents < 2:
        return "evaluation needs a second document: add more text"
    return (f"use more documents, or --split {num_documents - 1},1,0 (one of the "
            f"{num_documents} documents for validation)")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: prepare a corpus and print what was written (``examples/prepare_data.py``;
    the flags are :func:`gpt_recipe.data_parser`'s).

    ``--input`` takes UTF-8 text files (one file = one document) and directories (all their
    text files); unlike Megatron-LM's ``preprocess_data.py`` it does not read loose JSON.

    Returns:
        Process exit status (0 on success; errors exit with status 2 and a message).
    """
    from . import data_parser

    parser = data_parser()
    args = parser.parse_args(argv)

    try:
        skipped: List[str] = []
        files = _expand_inputs(args.input, args.suffix, skipped) if args.input else None
        if skipped:
            shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
            print(f"warning: skipped {len(skipped)} file(s) that hold no UTF-8 text: {shown}",
                  file=sys.stderr)
        if files == []:
            raise ValueError(f"no UTF-8 text files under {' '.join(args.input)}"
                             + (f" ({len(skipped)} skipped: not UTF-8 or empty)" if skipped else ""))
        record = prepare_corpus(
            args.output_prefix,
            files=files,
            vocab_size=args.vocab_size,
            max_bytes=args.max_bytes,
            tokenizer_path=args.tokenizer_model,
            force=args.force,
        )
    except (OSError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")

    status = "up to date, nothing written" if record.skipped else "written"
    print(f"{record.prefix}: {status} ({record.seconds:.1f} s)")
    bin_bytes = os.path.getsize(record.bin_path)
    print(f"  data:      {record.bin_path} ({bin_bytes:,} bytes, {record.dtype})")
    print(f"  index:     {record.idx_path}")
    asked = "" if args.tokenizer_model or record.vocab_size >= args.vocab_size else (
        f"; {args.vocab_size:,} asked: this text has no more distinct merges")
    print(f"  tokenizer: {record.tokenizer_path} (vocab {record.vocab_size:,}{asked})")
    print(f"  manifest:  {record.manifest_path}")
    print(
        f"  {record.num_documents:,} documents, {record.num_tokens:,} tokens "
        f"from {record.num_bytes:,} bytes of text"
    )
    print(f"  use: --data-path {record.prefix}")
    if documents_per_split(record.num_documents)[1] == 0:
        print(f"warning: with --split 98,2,0 (the default) the validation split gets no "
              f"document: {split_advice(record.num_documents)}", file=sys.stderr)
    return 0
