"""``patches/``: Megatron-LM's stock ``pretrain_gpt.py`` with hyper-connections, one patch per
release.

Without a checkout: each patch names its release's tag and commit and changes only
``pretrain_gpt.py`` and ``gpt_builders.py``, by calls into the package. With ``MEGATRON_LM_DIR``
(a Megatron-LM checkout at one of those commits): the patch applies to it, and the patched
``pretrain_gpt.py`` trains an mHC GPT on the CPU (2 gloo processes, PP=2, ``--mock-data``) with
the same losses as the package's entry point and the stability metrics in TensorBoard.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.megatron_lm import CPU_FLAGS, MEGATRON_LM_DIR, REPO, assert_ran, scalars, torchrun

PATCHES = sorted((REPO / "patches").glob("core_v*/hyper_connections.patch"))
PATCHED_FILES = ("gpt_builders.py", "pretrain_gpt.py")
# What the patched script imports from the checkout's top level, beside the patched files.
CHECKOUT_MODULES = ("model_provider.py",)

# Enables the package's CPU layer, then runs a script as __main__ (the patch is for GPUs).
CPU_RUNNER = """
import runpy, sys
from megatron.hyper_connections.cpu_compat import enable_cpu_megatron_training

enable_cpu_megatron_training()
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _commit(patch: Path) -> str:
    (commit,) = re.findall(
        r"^Made against NVIDIA/Megatron-LM commit ([0-9a-f]{40})", patch.read_text(), re.M
    )
    return commit


def test_every_release_has_a_patch_naming_its_commit():
    assert {p.parent.name for p in PATCHES} >= {"core_v0.16.1", "core_v0.19.0"}
    for patch in PATCHES:
        text = patch.read_text()
        assert f"(tag {patch.parent.name})" in text.splitlines()[2]
        _commit(patch)


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.parent.name)
def test_patches_only_call_into_the_package(patch):
    text = patch.read_text()
    assert re.findall(r"^diff --git a/(\S+)", text, re.M) == list(PATCHED_FILES)
    added = [line[1:] for line in text.splitlines() if line.startswith("+") and line[1:4] != "++ "]
    assert 3 <= len(added) <= 12, added
    for line in added:
        assert not re.match(r"\s*(def|class|if|for|while|try|with)\b", line), line


checkout = pytest.mark.skipif(
    MEGATRON_LM_DIR is None, reason="needs MEGATRON_LM_DIR, a Megatron-LM checkout"
)


@pytest.fixture(scope="module")
def checkout_patch() -> Path:
    head = subprocess.run(
        ["git", "-C", MEGATRON_LM_DIR, "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    matching = [patch for patch in PATCHES if _commit(patch) == head]
    if not matching:
        pytest.skip(f"no patch in patches/ was made against {MEGATRON_LM_DIR} (commit {head})")
    return matching[0]


@checkout
def test_patch_applies_to_the_checkout(checkout_patch):
    check = subprocess.run(
        ["git", "-C", MEGATRON_LM_DIR, "apply", "--check", str(checkout_patch)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr


FLAGS = [
    *("--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4"),
    *("--seq-length", "32", "--max-position-embeddings", "32"),
    *("--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "6"),
    *("--lr", "1e-2", "--log-interval", "3", "--eval-interval", "6", "--eval-iters", "1"),
    *("--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128"),
    *("--pipeline-model-parallel-size", "2", "--no-bias-dropout-fusion"),
    *("--use-hyper-connections", "--num-residual-streams", "4"),
    "--use-manifold-hyper-connections",
    *CPU_FLAGS,
]


@checkout
def test_patched_pretrain_gpt_trains_as_the_entry_point(checkout_patch, tmp_path):
    patched = tmp_path / "patched"
    patched.mkdir()
    for name in (*PATCHED_FILES, *CHECKOUT_MODULES):
        shutil.copy(Path(MEGATRON_LM_DIR) / name, patched / name)
    subprocess.run(["git", "apply", str(checkout_patch)], cwd=patched, check=True)
    (patched / "cpu_runner.py").write_text(CPU_RUNNER)

    # The patched script (its directory first, for gpt_builders and model_provider).
    script = ["cpu_runner.py", str(patched / "pretrain_gpt.py")]
    stock = torchrun(script, [*FLAGS, "--tensorboard-dir", str(patched / "tb")], patched / "log")
    assert_ran(stock)
    entry = tmp_path / "entry"
    entry.mkdir()
    flags = [*FLAGS, "--tensorboard-dir", str(entry / "tb")]
    ours = torchrun(
        ["-m", "megatron.hyper_connections.megatron_lm.pretrain_gpt"], flags, entry / "log"
    )
    assert_ran(ours)

    logged, expected = scalars(patched / "tb"), scalars(entry / "tb")
    assert logged["lm loss"] == pytest.approx(expected["lm loss"], rel=1e-6, abs=0.0)
    tag = "hyper-connections/forward_gain/composite_per_token/max"
    assert sorted(logged[tag]) == [3, 6]
    assert logged[tag] == pytest.approx(expected[tag], abs=1e-6)
