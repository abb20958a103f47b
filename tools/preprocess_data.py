"""Tokenize documents into megatron-core indexed datasets for pretraining.

    python tools/preprocess_data.py --input docs.jsonl --output-prefix data/my \\
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt \\
        --append-eod --workers 2

writes ``data/my_text_document.bin`` and ``.idx`` (one pair per ``--json-keys`` key, named
``<prefix>_<key>_document``), the ``--data-path`` prefix ``data/my_text_document``.

Inputs (``--input``, one or more): JSON Lines files (``.jsonl``/``.json``, one document per line,
text under ``--json-keys``), plain text files (one file is one document), directories (their
files, recursively in sorted order, hidden ones skipped, by the same rule), and the word
``embedded``: the Python standard library's sources (``megatron.hyper_connections.data.corpus``),
which exist on every machine. Plain text and ``embedded`` documents have the key ``text`` only.

Every option, the tokenizer files and the inputs are checked before anything is written. The
files are written under a temporary name in the output directory and renamed into place only
when complete, the ``.idx`` last, so an error or an interrupt never leaves a half-written
dataset. Token ids are stored as ``uint16`` for vocabularies under 65500 ids, else ``int32``
(megatron-core's ``DType.optimal_dtype``). Documents that tokenize to nothing are skipped; if
no document is left, nothing is written (an empty dataset cannot be trained on).

A run holds a lock on ``.<name>.lock`` beside the output (``flock``, released when the process
ends, however it ends) and refuses to start while another run writes the same prefix. The
temporary files live in a hidden ``.<name>.*.partial`` directory beside the output, removed at
the end; one left by a run that was killed (SIGKILL, a lost node) is removed by the next run
on the same prefix.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megatron.hyper_connections.data.corpus import DEFAULT_MAX_BYTES, stdlib_documents
from megatron.hyper_connections.data.tokenizers import (
    TOKENIZER_TYPES,
    Tokenizer,
    build_tokenizer,
)

EMBEDDED = "embedded"
JSON_SUFFIXES = (".jsonl", ".json")

# The tokenizer of a worker process, set once by the pool initializer.
_worker_tokenizer: Tokenizer | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Tokenize documents into megatron-core .bin/.idx indexed datasets."
    )
    group = parser.add_argument_group("input data")
    group.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="JSON Lines files, plain text files, directories, or 'embedded' (the Python "
        "standard library's sources)",
    )
    group.add_argument(
        "--json-keys", nargs="+", default=["text"], help="keys of the texts in JSON Lines input"
    )
    group.add_argument(
        "--embedded-max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help="size cap of the embedded corpus in bytes",
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument(
        "--tokenizer-type",
        default="ByteTokenizer",
        help=f"one of {', '.join(TOKENIZER_TYPES)} (default: ByteTokenizer, needs no file)",
    )
    group.add_argument("--vocab-file", help="GPT2BPETokenizer: vocab.json")
    group.add_argument("--merge-file", help="GPT2BPETokenizer: merges.txt")
    group.add_argument(
        "--tokenizer-file",
        "--tokenizer-model",
        dest="tokenizer_file",
        help="HuggingFaceTokenizer: a tokenizer.json, or a directory holding one",
    )
    group.add_argument(
        "--append-eod", action="store_true", help="end every document with the EOD id"
    )
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True)
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run the tool; returns, per written prefix, its document and token counts and dtype.
    Raises ValueError, FileNotFoundError or ImportError for bad options or inputs."""
    args = parse_args(argv)
    tokenizer, inputs = _check(args)

    from megatron.core.datasets.indexed_dataset import (
        DType,
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    outputs = {key: f"{args.output_prefix}_{key}_document" for key in args.json_keys}
    out_dir = Path(args.output_prefix).parent
    name = Path(args.output_prefix).name
    created = [d for d in (out_dir, *out_dir.parents) if not d.exists()]
    out_dir.mkdir(parents=True, exist_ok=True)
    builders = {}
    done = False
    lock = tmp_dir = None
    try:
        lock = _lock(out_dir / f".{name}.lock", args.output_prefix)
        for stale in out_dir.glob(f".{name}.*.partial"):  # left by killed runs: we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=out_dir))
        tmp = {key: str(tmp_dir / f"{key}_document") for key in outputs}
        for key in tmp:
            builders[key] = IndexedDatasetBuilder(get_bin_path(tmp[key]), dtype)
        stats = {
            p: {"documents": 0, "tokens": 0, "dtype": dtype.__name__} for p in outputs.values()
        }
        for document in _tokenized(args, tokenizer, inputs):
            for key, ids in document.items():
                if not ids:
                    continue
                if args.append_eod:
                    ids.append(tokenizer.eod)
                builders[key].add_document(ids, [len(ids)])
                stats[outputs[key]]["documents"] += 1
                stats[outputs[key]]["tokens"] += len(ids)
        for key, prefix in outputs.items():
            if stats[prefix]["documents"] == 0:
                raise ValueError(
                    f"--input {' '.join(args.input)}: no document has text to tokenize (under "
                    f"--json-keys {key!r}): an empty dataset cannot be trained on, nothing was "
                    "written"
                )
        for key, builder in builders.items():
            builder.finalize(get_idx_path(tmp[key]))
        for key, prefix in outputs.items():
            # The .idx goes last: a prefix with an .idx is complete.
            Path(get_idx_path(prefix)).unlink(missing_ok=True)
            os.replace(get_bin_path(tmp[key]), get_bin_path(prefix))
            os.replace(get_idx_path(tmp[key]), get_idx_path(prefix))
        done = True
    finally:
        for builder in builders.values():
            builder.data_file.close()
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if lock is not None:
            # Unlinked while held: a run that opens it later makes a new one, and this run
            # writes nothing more.
            Path(lock.name).unlink(missing_ok=True)
            lock.close()
        if not done:
            # Directories made for the output go too, deepest first, if nothing else is there.
            for directory in created:
                with contextlib.suppress(OSError):
                    directory.rmdir()
    return stats


def _lock(path: Path, output_prefix: str) -> Any:
    """``path`` opened and exclusively locked; ValueError if another run holds it."""
    lock = path.open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        lock.close()
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ValueError(
                f"--output-prefix {output_prefix}: another run is writing it (it holds {path})"
            ) from None
        return path.open("a")  # a file system without locks: go on unlocked
    return lock


def _check(args: argparse.Namespace) -> tuple[Tokenizer, list[tuple[str, Path | None]]]:
    """Everything that can be checked before writing: the tokenizer, the options, the inputs
    as (kind, path) with kind "embedded", "json" or "text"."""
    tokenizer = build_tokenizer(
        args.tokenizer_type,
        vocab_file=args.vocab_file,
        merges_file=args.merge_file,
        tokenizer_file=args.tokenizer_file,
    )
    if args.workers < 1:
        raise ValueError(f"--workers: {args.workers} is not a positive number of processes")
    if len(set(args.json_keys)) != len(args.json_keys) or not all(args.json_keys):
        raise ValueError(f"--json-keys: {args.json_keys} are not distinct non-empty keys")
    if args.embedded_max_bytes <= 0:
        raise ValueError(f"--embedded-max-bytes: {args.embedded_max_bytes} is not positive")
    output = Path(args.output_prefix)
    if not output.name or args.output_prefix.endswith(os.sep):
        raise ValueError(f"--output-prefix: {args.output_prefix!r} names a directory, not a prefix")
    for parent in (output.parent, *output.parent.parents):
        if parent.exists():
            if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"--output-prefix: {parent} is not a writable directory")
            break

    inputs: list[tuple[str, Path | None]] = []
    for item in args.input:
        if item == EMBEDDED:
            inputs.append((EMBEDDED, None))
            continue
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"--input: no such file or directory: {path}")
        files = _directory_files(path) if path.is_dir() else [path]
        if not files:
            raise ValueError(f"--input: {path} holds no files")
        for file in files:
            if not file.is_file() or not os.access(file, os.R_OK):
                raise ValueError(f"--input: {file} is not a readable file")
            inputs.append(("json" if file.suffix in JSON_SUFFIXES else "text", file))
    if args.json_keys != ["text"] and any(kind != "json" for kind, _ in inputs):
        raise ValueError(
            f"--json-keys {' '.join(args.json_keys)}: plain text and embedded inputs have only "
            "the key 'text'"
        )
    return tokenizer, inputs


def _directory_files(directory: Path) -> list[Path]:
    files = []
    for root, subdirs, names in os.walk(directory):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        files += [Path(root, name) for name in names if not name.startswith(".")]
    return sorted(files, key=lambda path: path.relative_to(directory).as_posix())


def _documents(
    args: argparse.Namespace, inputs: list[tuple[str, Path | None]]
) -> Iterator[dict[str, str]]:
    """Every document as {key: text}, in input order."""
    for kind, path in inputs:
        if kind == EMBEDDED:
            for document in stdlib_documents(args.embedded_max_bytes):
                yield {"text": document.text}
        elif kind == "text":
            try:
                yield {"text": path.read_text(encoding="utf-8")}
            except UnicodeDecodeError as error:
                raise ValueError(f"--input: {path} is not UTF-8 text: {error}") from error
        else:
            yield from _json_lines(path, args.json_keys)


def _json_lines(path: Path, keys: list[str]) -> Iterator[dict[str, str]]:
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"--input: {path} line {number}: not JSON: {error}") from None
                if not isinstance(record, dict):
                    raise ValueError(f"--input: {path} line {number}: not a JSON object")
                for key in keys:
                    if not isinstance(record.get(key), str):
                        raise ValueError(
                            f"--input: {path} line {number}: no text under --json-keys {key!r}"
                        )
                yield {key: record[key] for key in keys}
    except UnicodeDecodeError as error:
        raise ValueError(f"--input: {path} is not UTF-8 text: {error}") from error


def _tokenized(
    args: argparse.Namespace, tokenizer: Tokenizer, inputs: list[tuple[str, Path | None]]
) -> Iterator[dict[str, list[int]]]:
    documents = _documents(args, inputs)
    if args.workers == 1:
        yield from (_tokenize_with(tokenizer, document) for document in documents)
        return
    # fork where there is one: workers then need not import this script by name.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with context.Pool(args.workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        # imap keeps the input order, so the output does not depend on --workers.
        yield from pool.imap(_tokenize_in_worker, documents, chunksize=16)


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _tokenize_in_worker(document: dict[str, str]) -> dict[str, list[int]]:
    return _tokenize_with(_worker_tokenizer, document)


def _tokenize_with(tokenizer: Tokenizer, document: dict[str, str]) -> dict[str, list[int]]:
    return {key: tokenizer.tokenize(text) for key, text in document.items()}


if __name__ == "__main__":
    try:
        for written, counts in main().items():
            print(
                f"{written}: {counts['documents']} documents, {counts['tokens']} tokens "
                f"({counts['dtype']})"
            )
    except (ValueError, FileNotFoundError, ImportError) as error:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {error}")
