"""Train, validation and test GPT datasets from megatron-core indexed datasets.

The datasets are megatron-core's own: ``BlendedMegatronDatasetBuilder`` builds ``GPTDataset``
splits (and a ``BlendedDataset`` over several prefixes) from ``GPTDatasetConfig``. This module
adds what a pretraining entry point should check before it spends time on them: Megatron-LM's
``--data-path`` list (``[w1] prefix1 [w2] prefix2 ...``) is parsed and validated, every prefix
must have its ``.bin`` and ``.idx`` and the index must fit the data file (``check_index``: its
header, its size for the counts it announces, at least one document, and the token offsets of
its first and last sequences against the size of the ``.bin``), the split string must be well
formed, and no token id in the data may lie outside the tokenizer's vocabulary (it would index
past the embedding table).

megatron-core builds its sample indices with a C++ extension,
``megatron.core.datasets.helpers_cpp``. megatron-core's wheels ship it compiled and its source
distribution compiles it at install time (with pybind11), so nothing is built at run time;
Megatron-LM's ``compile_helpers()`` (``make``) is not needed and its Makefile is not installed.
``require_dataset_helpers()`` says what to do if an install lacks it.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy
import torch

from .tokenizers import Tokenizer

__all__ = [
    "build_gpt_datasets",
    "check_data_prefixes",
    "check_index",
    "check_vocab_size",
    "max_token_id",
    "parse_data_path",
    "require_dataset_helpers",
]

Blend = tuple[list[str], list[float] | None]

# Tokens read at a time by max_token_id: 128 MiB of int32, bounded memory for any file size.
_CHUNK = 1 << 25
_SPLIT_NAMES = ("train", "valid", "test")
_SPLIT = re.compile(r"\s*\d+(\.\d*)?\s*(,\s*\d+(\.\d*)?\s*){0,2}")


def build_gpt_datasets(
    data_path: Sequence[str] | None = None,
    *,
    tokenizer: Tokenizer,
    seq_length: int,
    split: str | None = None,
    seed: int = 1234,
    num_samples: Sequence[int | None] = (None, None, None),
    train_data_path: Sequence[str] | None = None,
    valid_data_path: Sequence[str] | None = None,
    test_data_path: Sequence[str] | None = None,
    path_to_cache: str | os.PathLike | None = None,
    is_built_on_rank: Callable[[], bool] | None = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = False,
    check_vocab: bool = True,
) -> tuple[Any, Any, Any]:
    """megatron-core's (train, valid, test) GPT datasets; a split without data is ``None``.

    Either ``data_path`` (Megatron-LM's ``--data-path``: prefixes, each optionally preceded by
    its weight) divided by ``split`` (``--split``, default ``"949,50,1"``), or per-split
    ``train_data_path`` / ``valid_data_path`` / ``test_data_path`` lists of the same form.
    ``num_samples`` is the number of samples per split; ``None`` takes one epoch of the split,
    which needs unweighted data. A sample is a dict of ``tokens`` and ``labels`` (each
    ``seq_length`` ids), ``loss_mask`` and ``position_ids``, and ``attention_mask`` only with
    ``create_attention_mask`` (a causal model makes its own).

    megatron-core caches the sample indices in ``path_to_cache`` (default: a ``cache``
    directory inside a directory named like each prefix). In a distributed run call this on
    every rank: rank 0 builds the indices first; ``is_built_on_rank`` (default: every rank)
    says which ranks build datasets at all. A blend of several prefixes with ``path_to_cache``
    needs torch.distributed initialised (megatron-core's ``BlendedDataset`` asks for the rank)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    per_split = (train_data_path, valid_data_path, test_data_path)
    if data_path is not None and any(p is not None for p in per_split):
        raise ValueError("--data-path and --train/valid/test-data-path are exclusive; give one")
    if data_path is None and all(p is None for p in per_split):
        raise ValueError("no data: give --data-path or --train/valid/test-data-path")
    if not isinstance(seq_length, int) or seq_length < 1:
        raise ValueError(f"--seq-length: {seq_length!r} is not a positive integer")
    if len(num_samples) != 3 or not all(
        n is None or (isinstance(n, int) and n >= 0) for n in num_samples
    ):
        raise ValueError(
            f"num_samples: {num_samples!r} is not three sample counts (int >= 0 or None)"
        )

    if data_path is not None:
        split = "949,50,1" if split is None else split
        blend = _drop_lone_weight(parse_data_path(data_path, "--data-path"))
        # megatron-core's own book-ends of each split, None for an empty one.
        ranges = convert_split_vector_to_split_matrix(_parse_split(split))
        blends: list[Blend | None] = [None if r is None else blend for r in ranges]
        config_blend: dict[str, Any] = {"blend": blend, "split": split}
    else:
        if split is not None:
            raise ValueError("--split applies to --data-path, not to per-split data paths")
        names = ("--train-data-path", "--valid-data-path", "--test-data-path")
        blends = [
            None if p is None else _drop_lone_weight(parse_data_path(p, name))
            for p, name in zip(per_split, names, strict=True)
        ]
        ranges = [None if b is None else (0.0, 1.0) for b in blends]
        config_blend = {"blend_per_split": blends}
    for name, blend, count in zip(_SPLIT_NAMES, blends, num_samples, strict=True):
        if blend is not None and blend[1] is not None and count is None:
            raise ValueError(
                f"weighted data paths need a number of {name} samples (num_samples): "
                "megatron-core draws a weighted blend to a fixed size"
            )

    prefixes = sorted({prefix for b in blends if b is not None for prefix in b[0]})
    blended = any(b is not None and len(b[0]) > 1 for b in blends)
    if blended and path_to_cache is not None and not torch.distributed.is_initialized():
        # megatron-core's BlendedDataset asks torch.distributed for the rank that writes its
        # cache, and fails with an unrelated-looking error when there is no process group.
        raise ValueError(
            "path_to_cache with several data prefixes needs torch.distributed initialised "
            "(megatron-core's BlendedDataset asks for the rank); initialise it, or leave "
            "path_to_cache None"
        )
    check_data_prefixes(prefixes)
    _check_splits_hold_tokens(blends, ranges, num_samples)
    if check_vocab:
        check_vocab_size(prefixes, tokenizer)
    require_dataset_helpers()

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        tokenizer=tokenizer,
        path_to_cache=None if path_to_cache is None else os.fspath(path_to_cache),
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
        **config_blend,
    )
    # A split without data gets size 0: megatron-core's builder checks and multiplies the size
    # of every split, built or not.
    sizes = [0 if b is None else n for b, n in zip(blends, num_samples, strict=True)]
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, is_built_on_rank or (lambda: True), config
    )
    return tuple(builder.build())


def parse_data_path(data_path: Sequence[str], option: str = "--data-path") -> Blend:
    """(prefixes, weights or None) of a Megatron-LM data path list: ``["a"]``, ``["a", "b"]``
    or ``["0.7", "a", "0.3", "b"]``; weights are positive and need not sum to 1."""
    if isinstance(data_path, (str, os.PathLike)):
        data_path = [os.fspath(data_path)]
    items = [os.fspath(item) for item in data_path]
    if not items:
        raise ValueError(f"{option}: no data prefix given")
    weights = [_as_float(item) for item in items[0::2]]
    if len(items) % 2 == 0 and all(w is not None for w in weights):
        prefixes = items[1::2]
        for weight, prefix in zip(weights, prefixes, strict=True):
            if not (0 < weight < math.inf) or _as_float(prefix) is not None:
                raise ValueError(
                    f"{option}: {weight} {prefix!r} is not a positive weight and a data prefix"
                )
        return prefixes, weights
    if any(_as_float(item) is not None for item in items):
        raise ValueError(
            f"{option}: {items!r} mixes weights and prefixes; give either only prefixes or "
            "a weight before every prefix"
        )
    return items, None


def check_data_prefixes(prefixes: Sequence[str]) -> None:
    """Raise FileNotFoundError naming the first prefix that lacks its ``.bin`` or ``.idx``,
    and ValueError for an index that does not fit its data file (``check_index``)."""
    for prefix in prefixes:
        missing = [s for s in (".bin", ".idx") if not os.path.isfile(prefix + s)]
        if missing:
            raise FileNotFoundError(
                f"data prefix {prefix}: no {' or '.join(prefix + s for s in missing)} "
                "(a prefix names the files without the .bin/.idx suffix)"
            )
    for prefix in prefixes:
        check_index(prefix)


# megatron-core's index layout (``indexed_dataset._IndexReader``): magic, version 1, dtype
# code, sequence count S, document-boundary count D; then int32 lengths [S], int64 byte
# offsets into the .bin [S], int64 document boundaries [D] and, for multimodal data, int8
# modes [S].
_INDEX_MAGIC = b"MMIDIDX\x00\x00"
_INDEX_HEADER = struct.Struct("<9sQBQQ")


def check_index(prefix: str) -> None:
    """Raise ValueError, naming the file and what is wrong, unless ``prefix.idx`` is a
    megatron-core index that fits ``prefix.bin``: header, size, document count, and the first
    and last sequence inside the data file. Reads a few bytes, whatever the dataset's size."""
    from megatron.core.datasets.indexed_dataset import DType

    idx, bin_ = prefix + ".idx", prefix + ".bin"
    size = os.path.getsize(idx)
    with open(idx, "rb") as stream:
        header = stream.read(_INDEX_HEADER.size)
        if len(header) < _INDEX_HEADER.size:
            raise ValueError(
                f"{idx}: {size} bytes, shorter than an index header ({_INDEX_HEADER.size} bytes): "
                "the file is truncated"
            )
        magic, version, code, sequences, boundaries = _INDEX_HEADER.unpack(header)
        if magic != _INDEX_MAGIC:
            raise ValueError(
                f"{idx}: not a megatron-core index (it starts with {magic!r}, not "
                f"{_INDEX_MAGIC!r}): the file is corrupt, or not an .idx"
            )
        if version != 1:
            raise ValueError(f"{idx}: index version {version}, megatron-core reads version 1")
        try:
            itemsize = DType.size(code)
        except ValueError:
            raise ValueError(f"{idx}: unknown token type code {code} in its header") from None
        expected = _INDEX_HEADER.size + 12 * sequences + 8 * boundaries
        if size not in (expected, expected + sequences):  # (+ modes, for multimodal data)
            raise ValueError(
                f"{idx}: {size} bytes, but its header announces {sequences} sequences and "
                f"{boundaries - 1} documents, which take {expected} bytes: the file is "
                "truncated or corrupt"
            )
        if sequences == 0 or boundaries < 2:
            raise ValueError(f"{idx}: the dataset holds no documents")

        def read(offset: int, dtype: type, count: int = 1) -> list[int]:
            stream.seek(offset)
            data = stream.read(count * numpy.dtype(dtype).itemsize)
            return numpy.frombuffer(data, dtype=dtype, count=count).tolist()

        lengths = _INDEX_HEADER.size
        pointers = lengths + 4 * sequences
        documents = pointers + 8 * sequences
        (first_pointer,) = read(pointers, numpy.int64)
        (last_length,) = read(lengths + 4 * (sequences - 1), numpy.int32)
        (last_pointer,) = read(pointers + 8 * (sequences - 1), numpy.int64)
        first_document, last_document = (
            read(documents, numpy.int64)[0],
            read(documents + 8 * (boundaries - 1), numpy.int64)[0],
        )
    if first_pointer != 0 or last_length < 0 or last_pointer < 0:
        raise ValueError(
            f"{idx}: its sequence offsets are corrupt (the first starts at byte {first_pointer}, "
            f"the last at {last_pointer} with {last_length} tokens)"
        )
    if (first_document, last_document) != (0, sequences):
        raise ValueError(
            f"{idx}: its document boundaries run from {first_document} to {last_document}, not "
            f"from 0 to its {sequences} sequences: the file is corrupt"
        )
    data_bytes = last_pointer + last_length * itemsize
    if os.path.getsize(bin_) != data_bytes:
        state = "cut short" if os.path.getsize(bin_) < data_bytes else "longer than that"
        raise ValueError(
            f"{bin_}: {os.path.getsize(bin_)} bytes, but {idx} places its last sequence at "
            f"bytes {last_pointer} to {data_bytes}: the data file is {state}, or the two files "
            "do not belong together"
        )


def max_token_id(prefix: str) -> int:
    """The largest token id in the indexed dataset at ``prefix`` (-1 if it holds no token),
    read in chunks so that memory stays bounded."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dtype = IndexedDataset(prefix).index.dtype
    if os.path.getsize(prefix + ".bin") == 0:
        return -1
    tokens = numpy.memmap(prefix + ".bin", dtype=dtype, mode="r")
    largest = -1
    for start in range(0, len(tokens), _CHUNK):
        largest = max(largest, int(tokens[start : start + _CHUNK].max()))
    return largest


def check_vocab_size(prefixes: Sequence[str], tokenizer: Tokenizer) -> None:
    """Raise ValueError if a prefix's data holds a token id the tokenizer does not have."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    vocab_size = tokenizer.vocab_size
    for prefix in prefixes:
        # Data whose dtype cannot hold an id >= vocab_size needs no scan (e.g. uint16 data and
        # a vocabulary of 65536 or more).
        if numpy.iinfo(IndexedDataset(prefix).index.dtype).max < vocab_size:
            continue
        largest = max_token_id(prefix)
        if largest >= vocab_size:
            raise ValueError(
                f"the data at {prefix} holds token id {largest} but the tokenizer's vocabulary "
                f"has only {vocab_size} entries"
            )


def require_dataset_helpers() -> None:
    """Raise ImportError with the remedy if megatron-core's compiled dataset helpers are
    missing (a megatron-core installed from source without building them)."""
    try:
        import megatron.core.datasets.helpers_cpp  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "megatron-core's compiled dataset helpers (megatron.core.datasets.helpers_cpp) are "
            "missing: install megatron-core from a wheel (pip install --force-reinstall "
            "--no-deps megatron-core), or build its source with pybind11 and a C++ compiler"
        ) from error


def _check_splits_hold_tokens(
    blends: Sequence[Blend | None],
    ranges: Sequence[tuple[float, float] | None],
    num_samples: Sequence[int | None],
) -> None:
    """Refuse a split that asks a fixed number of samples of a prefix whose share of the split
    holds no token: megatron-core's GPTDataset would add epochs forever to reach the count."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for name, blend, bounds, count in zip(_SPLIT_NAMES, blends, ranges, num_samples, strict=True):
        # Unweighted blends of several prefixes take one epoch of each, whatever the count.
        if blend is None or count is None or (len(blend[0]) > 1 and blend[1] is None):
            continue
        for prefix in blend[0]:
            # Keep the dataset referenced: its lengths are a view of a memory map it closes.
            dataset = IndexedDataset(prefix)
            lengths = dataset.sequence_lengths
            documents = len(lengths)
            # The same document range as megatron-core's builder gives the split.
            begin, end = (round(b * float(documents)) for b in bounds)
            tokens = int(lengths[begin:end].sum())
            if tokens == 0:
                raise ValueError(
                    f"the {name} split of {prefix} holds no tokens ({end - begin} of its "
                    f"{documents} documents), so it cannot give {count} samples: change "
                    "--split"
                    + ("" if blend[1] else f", or ask for one epoch ({name} num_samples None)")
                )


def _drop_lone_weight(blend: Blend) -> Blend:
    # One weighted prefix is one unweighted prefix; megatron-core would demand sample counts.
    return (blend[0], None) if len(blend[0]) == 1 else blend


def _parse_split(split: str | None) -> list[float]:
    """The normalised split vector, after a stricter check than megatron-core's asserts."""
    if split is None or not _SPLIT.fullmatch(split):
        raise ValueError(
            f"--split: {split!r} is not 1 to 3 comma-separated non-negative weights, "
            'e.g. "949,50,1"'
        )
    fractions = [float(part) for part in split.split(",")]
    if sum(fractions) <= 0:
        raise ValueError(f"--split: {split!r} gives no data to any split")
    return [f / sum(fractions) for f in fractions + [0.0] * (3 - len(fractions))]


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
