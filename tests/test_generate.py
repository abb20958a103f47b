"""tools/generate.py on a checkpoint of a tiny mHC run of the pretraining entry point.

The run (3 iterations, one process, checkpoints at iterations 2 and 3) and every generation
happen in a spawned process (``run_distributed`` with one rank), which sets up and tears down
its own process group; the option checks, which come before any work, run here.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from tests.distributed import run_distributed

SEQ_LENGTH = 32
PROMPT = "def "
LONG_PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    return 0\n"  # > SEQ_LENGTH bytes
NEW = 12


def _train_and_generate(rank: int, world_size: int, data: str, save: str) -> dict:
    import torch

    from megatron.hyper_connections.training.pretrain import main as pretrain
    from tools.generate import generate, generate_ids, loaded_model, main

    pretrain(
        [
            *("--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4"),
            *("--seq-length", str(SEQ_LENGTH), "--micro-batch-size", "2"),
            *("--train-iters", "3", "--lr", "1e-2", "--log-interval", "1", "--eval-iters", "0"),
            *("--data-path", data, "--split", "100,0,0", "--num-workers", "0"),
            *("--data-cache-path", str(Path(data).parent / "cache")),
            *("--use-hyper-connections", "--num-residual-streams", "4"),
            "--use-manifold-hyper-connections",
            *("--save", save, "--save-interval", "2"),
        ]
    )
    results: dict = {}
    cli = io.StringIO()
    with contextlib.redirect_stdout(cli):
        main(["--load", save, "--prompt", PROMPT, "--max-new-tokens", str(NEW)])
        main(["--load", save, "--iteration", "2", "--prompt", PROMPT, "--max-new-tokens", "3"])
    results["cli"] = cli.getvalue()

    with loaded_model(save) as (model, tokenizer, args):
        results["seq_length"] = args.seq_length
        prompt_ids = tokenizer.tokenize(PROMPT)
        results["prompt_ids"] = prompt_ids
        common = dict(vocab_size=tokenizer.vocab_size, start_id=tokenizer.eod)
        results["greedy_ids"] = [generate_ids(model, prompt_ids, NEW, **common) for _ in range(2)]
        results["greedy_text"] = [generate(model, tokenizer, PROMPT, NEW) for _ in range(2)]
        results["detokenized"] = PROMPT + tokenizer.detokenize(results["greedy_ids"][0][-NEW:])
        results["top1_ids"] = generate_ids(
            model, prompt_ids, NEW, top_k=1, temperature=0.7, **common
        )
        results["top1_text"] = generate(model, tokenizer, PROMPT, NEW, top_k=1)

        def sample(seed: int) -> list[int]:
            generator = torch.Generator().manual_seed(seed)
            return generate_ids(
                model, prompt_ids, NEW, top_k=50, temperature=2.0, generator=generator, **common
            )

        results["sampled"] = [sample(7), sample(7), sample(8)]
        long_ids = tokenizer.tokenize(LONG_PROMPT)
        results["long"] = (long_ids, generate_ids(model, long_ids, 4, **common))
        results["empty"] = generate_ids(model, [], 3, **common)
        results["training_after"] = model.training
    return results


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from tools.preprocess_data import main as preprocess

    data = tmp_path_factory.mktemp("data") / "corpus"
    flags = ["--input", "embedded", "--embedded-max-bytes", "50000", "--append-eod"]
    preprocess([*flags, "--output-prefix", str(data)])
    save = tmp_path_factory.mktemp("run") / "save"
    (results,) = run_distributed(
        _train_and_generate, 1, f"{data}_text_document", str(save), timeout=240
    )
    return save, results


def test_greedy_is_deterministic_and_has_the_requested_length(run: tuple[Path, dict]) -> None:
    _, results = run
    first, second = results["greedy_ids"]
    assert first == second
    assert len(first) == len(results["prompt_ids"]) + NEW
    assert first[: len(results["prompt_ids"])] == results["prompt_ids"]
    assert all(0 <= i < 257 for i in first)  # the byte tokenizer's ids, no padding ids
    text, again = results["greedy_text"]
    assert text == again == results["detokenized"]
    assert text.startswith(PROMPT)
    assert not results["training_after"]  # loaded_model's model stays in eval mode


def test_top_k_1_equals_greedy(run: tuple[Path, dict]) -> None:
    _, results = run
    assert results["top1_ids"] == results["greedy_ids"][0]
    assert results["top1_text"] == results["greedy_text"][0]


def test_top_k_with_a_seed_is_reproducible(run: tuple[Path, dict]) -> None:
    _, results = run
    seven, seven_again, eight = results["sampled"]
    assert seven == seven_again
    assert len(seven) == len(results["prompt_ids"]) + NEW
    assert seven != eight  # temperature 2 over 50 tokens: two seeds differ (fixed seeds)


def test_context_is_cut_to_the_sequence_length(run: tuple[Path, dict]) -> None:
    _, results = run
    long_ids, generated = results["long"]
    assert results["seq_length"] == SEQ_LENGTH < len(long_ids)
    assert generated[: len(long_ids)] == long_ids and len(generated) == len(long_ids) + 4
    assert len(results["empty"]) == 3


def test_command_line_prints_prompt_and_continuation(run: tuple[Path, dict]) -> None:
    _, results = run
    greedy = results["greedy_text"][0] + "\n"
    assert results["cli"].startswith(greedy)  # the same model and decoding as generate()
    assert results["cli"][len(greedy) :].startswith(PROMPT)  # --iteration 2


def _usage_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    from tools.generate import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_missing_checkpoint_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nowhere"
    err = _usage_error(capsys, ["--load", str(missing), "--prompt", "x"])
    assert f"--load {missing}: no such directory" in err
    err = _usage_error(capsys, ["--load", str(tmp_path), "--prompt", "x"])
    assert "no checkpoint there" in err


def test_prompt_that_is_not_utf8_is_refused_first(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # The bytes b"ab\xff" of a command line reach Python as "ab" and a lone surrogate.
    prompt = b"ab\xff".decode("utf-8", "surrogateescape")
    err = _usage_error(capsys, ["--load", str(tmp_path / "nowhere"), "--prompt", prompt])
    assert err.splitlines()[-1] == (
        "tools/generate.py: error: --prompt is not valid UTF-8 text (byte 0xff at character 2): "
        "give the prompt in UTF-8"
    )


def test_bad_options(run: tuple[Path, dict], capsys: pytest.CaptureFixture) -> None:
    save, _ = run
    base = ["--load", str(save), "--prompt", "x"]
    err = _usage_error(capsys, [*base, "--iteration", "5"])
    assert "--iteration 5: no complete checkpoint" in err and "complete ones: 2, 3" in err
    assert "not allowed with argument" in _usage_error(capsys, [*base, "--greedy", "--top-k", "3"])
    assert "--top-k" in _usage_error(capsys, [*base, "--top-k", "0"])
    assert "--temperature" in _usage_error(capsys, [*base, "--top-k", "3", "--temperature", "0"])
    assert "only sampling" in _usage_error(capsys, [*base, "--temperature", "0.5"])
    assert "only sampling" in _usage_error(capsys, [*base, "--seed", "3"])
    assert "--max-new-tokens" in _usage_error(capsys, [*base, "--max-new-tokens", "-1"])
