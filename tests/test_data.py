"""The data side of pretraining: tokenizers, the embedded corpus, tools/preprocess_data.py and
megatron-core GPT datasets built from its output."""

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest

from megatron.hyper_connections.data.corpus import stdlib_documents, stdlib_source_files
from megatron.hyper_connections.data.datasets import (
    build_gpt_datasets,
    max_token_id,
    parse_data_path,
    require_dataset_helpers,
)
from megatron.hyper_connections.data.tokenizers import (
    ByteTokenizer,
    Tokenizer,
    build_tokenizer,
)
from tests.processes import child_environment

TOOL = Path(__file__).resolve().parents[1] / "tools" / "preprocess_data.py"
TEXTS = [
    "def f(x):\n    return x + 1\n",
    "Grüße, 世界! 🙂 tabs\tand trailing spaces   ",
    "",  # tokenizes to nothing: skipped
    "the cat sat on the mat; the end.\n\n",
    "<|endoftext|> is plain text here",
]
PLAIN = "A plain text file is one document.\nSecond line.\n"
NO_TOKENIZERS = "needs the 'tokenizers' package (the 'data' extra)"
ROUND_TRIP = ["", "hello", "  leading and trailing  \n", "naïve café 🙂 \x00 NUL", "a\r\nb\tc"]


@pytest.fixture(scope="module")
def tool():
    """tools/preprocess_data.py as a module (registered, so that its workers can unpickle)."""
    spec = importlib.util.spec_from_file_location("preprocess_data", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture
def inputs(tmp_path):
    """A small JSON Lines file and a plain text file; returns their paths."""
    source = tmp_path / "src"
    source.mkdir()
    jsonl = source / "docs.jsonl"
    lines = [json.dumps({"text": t, "title": f"doc {i}"}) for i, t in enumerate(TEXTS)]
    jsonl.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    plain = source / "notes.txt"
    plain.write_text(PLAIN, encoding="utf-8")
    return jsonl, plain


@pytest.fixture
def gpt2_files(tmp_path):
    """A tiny GPT-2 vocab.json and merges.txt: the 256 byte symbols, a few merges, EOD."""
    tokenizers = pytest.importorskip("tokenizers", reason=NO_TOKENIZERS)
    vocab = {
        symbol: i for i, symbol in enumerate(sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    }
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    text = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges)
    (tmp_path / "merges.txt").write_text(text, encoding="utf-8")
    return tmp_path / "vocab.json", tmp_path / "merges.txt", vocab


@pytest.fixture
def hf_file(tmp_path):
    """A tokenizer.json of a byte-level BPE trained here on a few sentences."""
    tokenizers = pytest.importorskip("tokenizers", reason=NO_TOKENIZERS)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TEXTS * 3, trainer=trainer)
    path = tmp_path / "hf" / "tokenizer.json"
    path.parent.mkdir()
    tokenizer.save(str(path))
    return path


def files_under(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*")}


# Tokenizers.


def test_byte_tokenizer_round_trips_exactly():
    tokenizer = build_tokenizer("ByteTokenizer")
    assert isinstance(tokenizer, ByteTokenizer)
    assert (tokenizer.vocab_size, tokenizer.eod) == (257, 256)
    for text in ROUND_TRIP:
        ids = tokenizer.tokenize(text)
        assert ids == list(text.encode("utf-8"))
        assert tokenizer.detokenize(ids) == text
        assert tokenizer.detokenize([*ids, tokenizer.eod]) == text  # EOD has no text


def test_gpt2_bpe_tokenizer(gpt2_files):
    vocab_file, merges_file, vocab = gpt2_files
    tokenizer = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merges_file=merges_file)
    assert (tokenizer.vocab_size, tokenizer.eod) == (len(vocab), vocab["<|endoftext|>"])
    assert tokenizer.tokenize("the cat") == [vocab["t"], vocab["he"], vocab["Ġcat"]]
    assert tokenizer.tokenize(" the") == [vocab["Ġthe"]]
    for text in ROUND_TRIP + TEXTS:
        assert tokenizer.detokenize(tokenizer.tokenize(text)) == text
    # As in Megatron-LM, the EOD string inside a text is text, not the EOD id.
    assert tokenizer.eod not in tokenizer.tokenize("<|endoftext|>")


def test_huggingface_tokenizer(hf_file):
    tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_file=hf_file)
    assert 257 < tokenizer.vocab_size <= 300
    assert tokenizer.eod == 0  # the special token, first in the trained vocabulary
    for text in ROUND_TRIP + TEXTS:
        ids = tokenizer.tokenize(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.detokenize(ids) == text
    assert len(tokenizer.tokenize(TEXTS[3])) < len(TEXTS[3])  # merges were learnt
    # A directory holding tokenizer.json works too.
    assert build_tokenizer("HuggingFaceTokenizer", tokenizer_file=hf_file.parent).eod == 0


def test_huggingface_tokenizer_eod_from_config(hf_file):
    from megatron.hyper_connections.data.tokenizers import HuggingFaceTokenizer

    text = hf_file.read_text(encoding="utf-8")
    hf_file.write_text(text.replace("<|endoftext|>", "<unusual_end>"), encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizer\.json has no end-of-document token"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_file=hf_file)
    (hf_file.parent / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<unusual_end>"}}), encoding="utf-8"
    )
    assert build_tokenizer("HuggingFaceTokenizer", tokenizer_file=hf_file).eod == 0
    assert HuggingFaceTokenizer(hf_file, eod_token="Ġ").eod != 0


@pytest.mark.parametrize(
    ("kind", "files", "error", "message"),
    [
        (
            "SentencePieceTokenizer",
            {},
            ValueError,
            "--tokenizer-type: 'SentencePieceTokenizer' is not supported; allowed: "
            "ByteTokenizer, GPT2BPETokenizer, HuggingFaceTokenizer",
        ),
        (
            "GPT2BPETokenizer",
            {"vocab_file": "v.json"},
            ValueError,
            "--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file",
        ),
        (
            "ByteTokenizer",
            {"tokenizer_file": "t.json"},
            ValueError,
            "--tokenizer-file is not used by --tokenizer-type ByteTokenizer",
        ),
        (
            "HuggingFaceTokenizer",
            {"tokenizer_file": "missing/tokenizer.json"},
            FileNotFoundError,
            "--tokenizer-file: no such file: missing/tokenizer.json",
        ),
    ],
)
def test_build_tokenizer_errors(kind, files, error, message):
    with pytest.raises(error) as raised:
        build_tokenizer(kind, **files)
    assert str(raised.value) == message


def test_unreadable_tokenizer_files(gpt2_files, tmp_path):
    vocab_file, merges_file, _ = gpt2_files
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"--vocab-file: cannot read {bad}")):
        build_tokenizer("GPT2BPETokenizer", vocab_file=bad, merges_file=merges_file)
    with pytest.raises(ValueError, match=re.escape(f"--merge-file: {tmp_path} is not a file")):
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merges_file=tmp_path)
    merges_file.write_text("#version: 0.2\nq z\n", encoding="utf-8")
    with pytest.raises(ValueError, match="does not fit --vocab-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merges_file=merges_file)
    with pytest.raises(ValueError, match=re.escape(f"--tokenizer-file: cannot read {bad}")):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_file=bad)


def test_missing_tokenizers_package_names_the_extra(monkeypatch, tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}", encoding="utf-8")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match=r"megatron-hyper-connections\[data\]"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_file=tmp_path / "tokenizer.json")


# The embedded corpus.


def test_embedded_corpus_is_deterministic():
    documents = list(stdlib_documents(max_bytes=300_000))
    assert documents and documents == list(stdlib_documents(max_bytes=300_000))
    assert sum(len(d.text.encode("utf-8")) for d in documents) <= 300_000
    assert all(d.name.endswith(".py") and d.text for d in documents)
    assert [d.name for d in documents] == sorted(d.name for d in documents)
    assert documents == list(stdlib_documents(max_bytes=600_000))[: len(documents)]
    excluded = {"site-packages", "dist-packages", "test", "tests", "encodings"}
    names = [path.parts for path in stdlib_source_files()]
    assert not any(excluded.intersection(parts) for parts in names)
    with pytest.raises(ValueError, match="max_bytes: 0 is not a positive number of bytes"):
        stdlib_documents(max_bytes=0)


# Preprocessing and datasets.


def expected_documents(tokenizer: Tokenizer) -> list[list[int]]:
    texts = [t for t in TEXTS if t] + [PLAIN]
    return [[*tokenizer.tokenize(t), tokenizer.eod] for t in texts]


def tokenizer_options(kind: str, request) -> list[str]:
    if kind == "ByteTokenizer":
        return []
    vocab_file, merges_file, _ = request.getfixturevalue("gpt2_files")
    return ["--vocab-file", str(vocab_file), "--merge-file", str(merges_file)]


@pytest.mark.parametrize("kind", ["ByteTokenizer", "GPT2BPETokenizer"])
def test_preprocess_round_trip(tool, inputs, tmp_path, kind, request):
    """Documents in, the same token ids out of megatron-core's IndexedDataset and GPTDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    options = tokenizer_options(kind, request)
    out = tmp_path / "out"
    argv = ["--input", *map(str, inputs), "--output-prefix", str(out / "corpus")]
    stats = tool.main([*argv, "--tokenizer-type", kind, *options, "--append-eod"])
    prefix = str(out / "corpus_text_document")
    files = dict(zip(("vocab_file", "merges_file"), options[1::2], strict=False))
    tokenizer = build_tokenizer(kind, **files)
    expected = expected_documents(tokenizer)
    assert stats == {
        prefix: {
            "documents": len(expected),
            "tokens": sum(map(len, expected)),
            "dtype": "uint16",
        }
    }
    assert files_under(out) == {"corpus_text_document.bin", "corpus_text_document.idx"}
    indexed = IndexedDataset(prefix)
    assert indexed.index.dtype == numpy.uint16
    assert [indexed[i].tolist() for i in range(len(indexed))] == expected
    assert max_token_id(prefix) == max(max(doc) for doc in expected)

    seq_length = 8
    train, valid, test = build_gpt_datasets(
        [prefix], tokenizer=tokenizer, seq_length=seq_length, split="1,0,0", seed=7
    )
    assert valid is None and test is None
    # One epoch: the documents in the dataset's shuffled order, cut into samples of
    # seq_length + 1 tokens that overlap by one; the dataset serves them in shuffled order.
    assert sorted(train.document_index.tolist()) == list(range(len(expected)))
    stream = numpy.concatenate([expected[d] for d in train.document_index])
    assert len(train) == (len(stream) - 1) // seq_length
    for position in range(len(train)):
        sample = train[position]
        text = numpy.concatenate([sample["tokens"].numpy(), sample["labels"].numpy()[-1:]])
        start = int(train.shuffle_index[position]) * seq_length
        numpy.testing.assert_array_equal(text, stream[start : start + seq_length + 1])


def test_preprocess_embedded_workers_and_keys(tool, inputs, tmp_path):
    """--workers does not change the output; each --json-keys key gets its own dataset."""
    argv = ["--input", "embedded", "--embedded-max-bytes", "200000", "--append-eod"]
    one = tool.main([*argv, "--output-prefix", str(tmp_path / "one")])
    two = tool.main([*argv, "--output-prefix", str(tmp_path / "two"), "--workers", "2"])
    assert list(one.values()) == list(two.values())
    assert next(iter(one.values()))["documents"] == len(list(stdlib_documents(200_000)))
    for suffix in (".bin", ".idx"):
        one_bytes = (tmp_path / f"one_text_document{suffix}").read_bytes()
        assert one_bytes == (tmp_path / f"two_text_document{suffix}").read_bytes()

    keys = str(tmp_path / "keys")
    stats = tool.main(
        ["--input", str(inputs[0]), "--json-keys", "text", "title", "--output-prefix", keys]
    )
    assert {Path(p).name: s["documents"] for p, s in stats.items()} == {
        "keys_text_document": 4,
        "keys_title_document": 5,
    }


def test_blends_and_splits(tool, tmp_path):
    for name in (str(tmp_path / "a"), str(tmp_path / "b")):
        tool.main(
            ["--input", "embedded", "--embedded-max-bytes", "100000", "--output-prefix", name]
        )
    a, b = str(tmp_path / "a_text_document"), str(tmp_path / "b_text_document")
    tokenizer = ByteTokenizer()
    train, valid, test = build_gpt_datasets([a], tokenizer=tokenizer, seq_length=32, split="3,1,0")
    assert test is None
    documents = set(train.indices.tolist()) | set(valid.indices.tolist())
    assert not set(train.indices.tolist()) & set(valid.indices.tolist())
    assert documents == set(range(len(list(stdlib_documents(100_000)))))

    train, valid, test = build_gpt_datasets(
        ["0.7", a, "0.3", b],
        tokenizer=tokenizer,
        seq_length=32,
        split="9,1,0",
        num_samples=(100, 10, None),
    )
    assert (len(train), len(valid), test) == (100, 10, None)
    assert train[0]["tokens"].shape == (32,)
    assert parse_data_path(["0.7", a, "0.3", b]) == ([a, b], [0.7, 0.3])

    # Megatron-LM's --train-data-path / --valid-data-path: one epoch of each.
    train, valid, test = build_gpt_datasets(
        train_data_path=[a], valid_data_path=[b], tokenizer=tokenizer, seq_length=32
    )
    assert test is None
    assert len(train) == len(valid) == (token_count(a) - 1) // 32


def token_count(prefix: str) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)  # referenced: it unmaps its arrays when collected
    return int(dataset.sequence_lengths.sum())


def test_blend_cached_in_distributed_run(megatron_single_rank, tool, tmp_path):
    """path_to_cache with a blend goes through megatron-core's rank-0-first code."""
    for name in (str(tmp_path / "a"), str(tmp_path / "b")):
        tool.main(["--input", "embedded", "--embedded-max-bytes", "50000", "--output-prefix", name])
    prefixes = [str(tmp_path / "a_text_document"), str(tmp_path / "b_text_document")]
    for _ in range(2):  # the second build reads the cache
        train, _, _ = build_gpt_datasets(
            prefixes,
            tokenizer=ByteTokenizer(),
            seq_length=16,
            split="1,0,0",
            num_samples=(20, None, None),
            path_to_cache=tmp_path / "cache",
        )
        assert len(train) == 20
    assert any((tmp_path / "cache").iterdir())


# Errors: each raises before writing anything and leaves no output.


@pytest.mark.parametrize(
    ("argv", "error", "message"),
    [
        (["--input", "nowhere.jsonl"], FileNotFoundError, "--input: no such file or directory"),
        (["--tokenizer-type", "BertWordPieceCase"], ValueError, "'BertWordPieceCase' is not"),
        (["--tokenizer-type", "GPT2BPETokenizer"], ValueError, "needs --vocab-file and"),
        (["--vocab-file", "v.json"], ValueError, "--vocab-file is not used by"),
        (["--workers", "0"], ValueError, "--workers: 0 is not a positive"),
        (["--json-keys", "title"], ValueError, "plain text and embedded inputs have only"),
        (["--input", "{bad_line}"], ValueError, r"bad\.jsonl line 2: not JSON"),
        (["--input", "{no_key}"], ValueError, r"no_key\.jsonl line 1: no text under"),
        (["--input", "{empty_dir}"], ValueError, "holds no files"),
        (
            ["--input", "{empty_file}", "{no_text}"],
            ValueError,
            r"--input \S+empty\.jsonl \S+no_text\.jsonl: no document has text to tokenize "
            r"\(under --json-keys 'text'\): an empty dataset cannot be trained on, nothing was "
            "written",
        ),
    ],
)
def test_preprocess_errors_leave_no_output(tool, inputs, tmp_path, argv, error, message):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
    (tmp_path / "no_key.jsonl").write_text('{"title": "x"}\n', encoding="utf-8")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "no_text.jsonl").write_text('{"text": ""}\n', encoding="utf-8")
    paths = {
        "bad_line": tmp_path / "bad.jsonl",
        "no_key": tmp_path / "no_key.jsonl",
        "empty_dir": tmp_path / "empty",
        "empty_file": tmp_path / "empty.jsonl",
        "no_text": tmp_path / "no_text.jsonl",
    }
    argv = [a.format(**paths) for a in argv]
    if "--input" not in argv:
        argv = ["--input", *map(str, inputs), *argv]
    before = files_under(tmp_path)
    with pytest.raises(error, match=message):
        tool.main([*argv, "--output-prefix", str(tmp_path / "out" / "corpus")])
    assert files_under(tmp_path) == before


def test_preprocess_command_line_error(tmp_path):
    """The script reports an error in one line and exits non-zero, writing nothing."""
    missing = str(tmp_path / "missing.txt")
    result = subprocess.run(
        [sys.executable, str(TOOL), "--input", missing, "--output-prefix", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert result.stderr.strip() == (
        f"preprocess_data.py: error: --input: no such file or directory: {tmp_path}/missing.txt"
    )
    assert list(tmp_path.iterdir()) == []


def test_preprocess_killed_mid_way_is_cleaned_up_by_the_next_run(tool, tmp_path):
    """SIGKILL leaves the hidden staging directory; the next run on the prefix removes it."""
    from tests.processes import ProcessTree

    out = tmp_path / "out"
    command = [sys.executable, str(TOOL), "--input", "embedded", "--output-prefix"]
    command += [str(out / "corpus"), "--embedded-max-bytes", "30000000"]
    env = child_environment(PYTHONPATH=str(TOOL.parents[1]))
    with ProcessTree(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as run:
        deadline = time.monotonic() + 120
        while not list(out.glob(".corpus.*.partial")):  # made before the first document
            assert run.poll() is None, run.popen.stderr.read().decode()
            assert time.monotonic() < deadline, "the tool did not start writing"
            time.sleep(0.02)
        run.kill()
    (staging,) = out.glob(".corpus.*.partial")
    assert not (out / "corpus_text_document.idx").exists()

    flags = ["--input", "embedded", "--embedded-max-bytes", "20000"]
    stats = tool.main([*flags, "--output-prefix", str(out / "corpus")])
    assert not staging.exists()
    assert files_under(out) == {"corpus_text_document.bin", "corpus_text_document.idx"}
    assert next(iter(stats.values()))["documents"] > 0


def test_preprocess_refuses_a_second_run_on_the_same_prefix(tool, tmp_path):
    import fcntl

    (tmp_path / "out").mkdir()
    with (tmp_path / "out" / ".corpus.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a run in progress holds it
        with pytest.raises(ValueError) as raised:
            tool.main(["--input", "embedded", "--output-prefix", str(tmp_path / "out" / "corpus")])
    assert str(raised.value) == (
        f"--output-prefix {tmp_path}/out/corpus: another run is writing it (it holds "
        f"{tmp_path}/out/.corpus.lock)"
    )
    assert files_under(tmp_path / "out") == {".corpus.lock"}


def test_dataset_errors(tool, inputs, tmp_path):
    out = tmp_path / "out"
    tool.main(["--input", *map(str, inputs), "--output-prefix", str(out / "c"), "--append-eod"])
    prefix = str(out / "c_text_document")

    class SmallVocab(ByteTokenizer):
        @property
        def vocab_size(self) -> int:
            return 200

    before = files_under(tmp_path)
    cases = [
        (
            dict(data_path=[prefix], tokenizer=SmallVocab()),
            ValueError,
            f"the data at {prefix} holds token id 256 but the tokenizer's vocabulary has only "
            "200 entries",
        ),
        (
            dict(data_path=[str(out / "nope")]),
            FileNotFoundError,
            f"data prefix {out}/nope: no {out}/nope.bin or {out}/nope.idx",
        ),
        (dict(data_path=[prefix], split="9,1,x"), ValueError, "--split: '9,1,x' is not 1 to 3"),
        (
            dict(data_path=["0.5", prefix, "0.5", prefix]),
            ValueError,
            "weighted data paths need a number of train samples",
        ),
        (dict(data_path=["0.5", prefix, prefix]), ValueError, "mixes weights and prefixes"),
        (dict(data_path=["-1", prefix]), ValueError, "is not a positive weight"),
        (
            dict(data_path=[prefix], split="100,0,1", num_samples=(10, None, 10)),
            ValueError,
            f"the test split of {prefix} holds no tokens (0 of its 5 documents)",
        ),
        (
            dict(data_path=[prefix], train_data_path=[prefix]),
            ValueError,
            "--data-path and --train/valid/test-data-path are exclusive",
        ),
    ]
    for kwargs, error, message in cases:
        kwargs = {"tokenizer": ByteTokenizer(), "seq_length": 8, **kwargs}
        with pytest.raises(error) as raised:
            build_gpt_datasets(**kwargs)
        assert message in str(raised.value)
    assert files_under(tmp_path) == before  # no index cache was written either


def test_missing_dataset_helpers_are_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron.core.datasets.helpers_cpp", None)
    with pytest.raises(ImportError, match="install megatron-core from a wheel"):
        require_dataset_helpers()
