"""megatron-core's activation recompute with hyper-connections, one process.

Every recompute mode megatron-core 0.16.1 offers without Transformer Engine re-runs HC code in
the backward pass: full recompute re-runs whole layers (width connection, the stash on
``_HyperConnectionBDA``, depth connection, HC dropout) inside ``tensor_parallel.checkpoint``;
selective recompute re-runs the core attention, the pre-norms (whose input is the HC branch
input h0) or the MLP. HC runs three ways (``SETTINGS``): the pytorch backend (plain autograd,
with HC dropout), the lean backend (the memory-lean autograd functions, no HC dropout), and that
with the mHC paper's state chain.
With hidden and attention dropout on (and HC dropout where the setting has it), the loss and
every parameter's gradient must equal the run without recompute exactly, which holds only if
megatron's checkpoint replays the RNG (on CPU, cpu_compat's "device" generator) and the stash
hands the depth connection the state of the same layer call.

The saved-activation figures (bytes held for backward at the end of the forward pass, in units
of one [s, b, C] fp32 activation per layer) are printed by
``test_recompute_saves_activation_memory``.

Upstream limitations found here (megatron-core 0.16.1, independent of hyper-connections):
- ``recompute_modules=["layernorm"]`` needs Transformer Engine: ``CheckpointWithoutOutput()``
  sets ``self.fp8 = fp8 is not None``, True for its default ``fp8=False``, and then calls TE's
  ``FP8GlobalStateManager`` (NameError). The layernorm cases here undo that one line.
- ``recompute_modules=["mlp"]`` needs ``add_bias_linear=False``: the MLP returns its fc2 bias
  Parameter through ``CheckpointFunction``, which gives the Parameter a grad_fn, and backward
  then recurses into the checkpoint forever.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Any

import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import random as mcore_random

from tests.models import (
    BATCH,
    SEQ,
    TINY,
    VARIANTS,
    build_baseline,
    build_gpt,
    lm_batch,
    make_config,
    perturb_hyper_connections,
)

pytestmark = pytest.mark.usefixtures("megatron_single_rank")

NUM_LAYERS = 4
DROPOUT = dict(hidden_dropout=0.1, attention_dropout=0.1)

# How the HC operations run (backends.select_backend): with hyper_connections_dropout > 0 the
# pytorch backend (plain autograd); without it the lean one (memory-lean autograd functions);
# with recompute_hyper_connections also the mHC paper's state chain (rebuilt in backward).
SETTINGS: dict[str, dict[str, Any]] = {
    "hc-dropout": dict(hyper_connections_dropout=0.1),
    "lean": {},
    "lean+state-recompute": dict(recompute_hyper_connections=True),
}

MODES: dict[str, dict[str, Any]] = {
    "none": {},
    "full-uniform-1": dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
    ),
    "full-uniform-2": dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2
    ),
    "full-block-1": dict(
        recompute_granularity="full", recompute_method="block", recompute_num_layers=1
    ),
    "full-block-2": dict(
        recompute_granularity="full", recompute_method="block", recompute_num_layers=2
    ),
    "selective-core_attn": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
    "selective-layernorm": dict(recompute_granularity="selective", recompute_modules=["layernorm"]),
    # add_bias_linear=False: see the module docstring.
    "none-nobias": dict(add_bias_linear=False),
    "selective-mlp": dict(
        recompute_granularity="selective", recompute_modules=["mlp"], add_bias_linear=False
    ),
    "selective-all": dict(
        recompute_granularity="selective",
        recompute_modules=["core_attn", "layernorm", "mlp"],
        add_bias_linear=False,
    ),
}
RECOMPUTE_MODES = [m for m in MODES if not m.startswith("none")]


def _reference_mode(mode: str) -> str:
    return "none-nobias" if MODES[mode].get("add_bias_linear") is False else "none"


@contextlib.contextmanager
def _layernorm_recompute_without_te():
    """Undo megatron-core 0.16.1's ``self.fp8 = fp8 is not None`` in CheckpointWithoutOutput,
    which sends the default (fp8=False) through Transformer Engine's FP8 state; with TE
    installed nothing is changed."""
    if mcore_random.HAVE_TE:
        yield
        return
    cls = mcore_random.CheckpointWithoutOutput
    original = cls.__init__

    def init(self, fp8=False):
        original(self, fp8)
        self.fp8 = False

    cls.__init__ = init
    try:
        yield
    finally:
        cls.__init__ = original


class _Saved:
    """What autograd holds for one saved tensor; a weak reference tells whether it still does."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


@contextlib.contextmanager
def _saved_for_backward(model: torch.nn.Module, constants: tuple[torch.Tensor, ...] = ()):
    """Collects the tensors the decoder layers save for backward during the forward pass.

    Yields a callable giving the bytes of the unique storages still held by autograd (freed
    ones, and storages that megatron's CheckpointWithoutOutput discarded, count as 0),
    parameters and ``constants`` (the attention mask) excluded. Recording starts after the
    decoder's stream expansion and stops at the final norm (after the streams are reduced), so
    it covers exactly the layers.
    """
    held: weakref.WeakSet[_Saved] = weakref.WeakSet()
    recording = [False]

    def pack(tensor: torch.Tensor) -> Any:
        if not recording[0]:
            return tensor
        saved = _Saved(tensor)
        held.add(saved)
        return saved

    def unpack(saved: Any) -> torch.Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def start(*_args: Any) -> None:
        recording[0] = True

    def stop(*_args: Any) -> None:
        recording[0] = False

    def saved_bytes() -> int:
        excluded = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *constants)}
        storages = {}
        for saved in list(held):
            storage = saved.tensor.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in excluded:
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    hooks = [
        model.decoder.register_forward_pre_hook(start),
        model.decoder.final_layernorm.register_forward_pre_hook(stop),
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield saved_bytes
    finally:
        for hook in hooks:
            hook.remove()


def _causal_mask() -> torch.Tensor:
    # Passed explicitly: with attention_mask=None megatron builds the causal mask with
    # device="cuda", which cpu_compat redirects in the forward pass but not in a recomputation
    # run by autograd's backward (see test_recompute_with_the_default_causal_mask).
    return torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]


def _build(variant: str | None, setting: str | None, mode: str) -> torch.nn.Module:
    options = dict(num_layers=NUM_LAYERS, **DROPOUT, **MODES[mode])
    if variant is None:
        model = build_baseline(**options)
    else:
        model = build_gpt(make_config(VARIANTS[variant], **SETTINGS[setting], **options))
        perturb_hyper_connections(model, seed=5, scale=0.1)
    model.train()
    return model


@functools.cache
def _run(variant: str | None, setting: str | None, mode: str, rng_seed: int = 77) -> dict:
    """One forward and backward in training mode; the loss, all gradients, the saved bytes."""
    model = _build(variant, setting, mode)
    batch = lm_batch(seed=3)
    torch.manual_seed(rng_seed)  # dropout masks: hidden and HC dropout use the CPU generator,
    tensor_parallel.model_parallel_cuda_manual_seed(rng_seed)  # attention dropout the tracker
    layernorm = "layernorm" in MODES[mode].get("recompute_modules", [])
    workaround = _layernorm_recompute_without_te if layernorm else contextlib.nullcontext
    with workaround():
        mask = _causal_mask()
        with _saved_for_backward(model, constants=(mask,)) as saved_bytes:
            per_token = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
            loss = per_token.float().mean()
        nbytes = saved_bytes()
        stashes_after_forward = _stashes(model)
        loss.backward()
    unit = SEQ * BATCH * TINY["hidden_size"] * 4  # one [s, b, C] fp32 activation
    return dict(
        loss=loss.detach(),
        grads={n: p.grad for n, p in model.named_parameters()},
        units_per_layer=nbytes / unit / NUM_LAYERS,
        stashes=stashes_after_forward + _stashes(model),
    )


def _stashes(model: torch.nn.Module) -> list:
    return [
        bda.depth_inputs
        for layer in model.decoder.layers
        for bda in (layer.self_attn_bda, layer.mlp_bda)
        if hasattr(bda, "depth_inputs")
    ]


# The modes run for each setting: every mode on the memory-lean path (the default one); on the
# plain-autograd path (HC dropout) those that replay random numbers; with the state chain the
# selective modes (it is refused with full recompute, which would leave it nothing to rebuild).
SETTING_MODES = {
    "hc-dropout": [m for m in RECOMPUTE_MODES if m.startswith("full")] + ["selective-core_attn"],
    "lean": RECOMPUTE_MODES,
    "lean+state-recompute": ["selective-core_attn", "selective-all"],
}

CASES = [
    (variant, setting, mode)
    for variant in ("DHCx4", "mHCx4")
    for setting, modes in SETTING_MODES.items()
    for mode in modes
] + [("Frac4", setting, "full-uniform-1") for setting in ("hc-dropout", "lean")]


@pytest.mark.parametrize(("variant", "setting", "mode"), CASES)
def test_recompute_gives_the_same_loss_and_gradients(variant: str, setting: str, mode: str):
    expected = _run(variant, setting, _reference_mode(mode))
    got = _run(variant, setting, mode)

    assert all(s is None for s in got["stashes"]), "a depth-connection stash outlived its layer"
    assert torch.equal(got["loss"], expected["loss"]), (
        f"{variant} {setting} {mode}: loss {got['loss'].item()!r} != {expected['loss'].item()!r}"
    )
    assert got["grads"].keys() == expected["grads"].keys()
    for name, grad in got["grads"].items():
        reference = expected["grads"][name]
        assert grad is not None and reference is not None, f"{name} got no gradient"
        same = torch.equal(grad, reference)
        assert same, (
            f"{variant} {setting} {mode}: grad of {name} differs from no recompute by "
            f"{(grad - reference).abs().max().item():.3e}"
        )
    hc_grads = [g for n, g in expected["grads"].items() if "hyper_conn" in n]
    assert hc_grads and all(g.abs().sum() > 0 for g in hc_grads), "an HC path carried no gradient"


@pytest.mark.parametrize("setting", ["hc-dropout", "lean"])
def test_dropout_makes_the_comparison_sensitive_to_the_rng(setting: str) -> None:
    """Another dropout draw changes loss and gradients (of HC parameters too), so an exact
    match under recompute means the recomputation replayed the forward pass's random numbers."""
    first = _run("DHCx4", setting, "none")
    second = _run("DHCx4", setting, "none", rng_seed=78)
    assert not torch.equal(first["loss"], second["loss"])
    name = "decoder.layers.0.hyper_conn_attn.static_res"
    assert not torch.equal(first["grads"][name], second["grads"][name])


_SHORT = {"hc-dropout": "drop", "lean": "lean", "lean+state-recompute": "chain"}
MEMORY_COLUMNS = {
    "residual": (None, None),
    **{
        f"{variant[:3]}:{_SHORT[setting]}": (variant, setting)
        for variant in ("DHCx4", "mHCx4")
        for setting in SETTINGS
    },
}


def test_recompute_saves_activation_memory(capsys: pytest.CaptureFixture) -> None:
    table = {}
    for label, (variant, setting) in MEMORY_COLUMNS.items():
        modes = RECOMPUTE_MODES if variant is None else SETTING_MODES[setting]
        modes = sorted({*modes, *map(_reference_mode, modes)}, key=list(MODES).index)
        table[label] = {mode: _run(variant, setting, mode)["units_per_layer"] for mode in modes}
    with capsys.disabled():
        print(
            f"\nsaved for backward per layer, in units of one [s, b, C] fp32 activation "
            f"(s={SEQ}, b={BATCH}, C={TINY['hidden_size']}, {NUM_LAYERS} layers, training, "
            f"hidden and attention dropout 0.1; n=4; drop: HC dropout 0.1, plain autograd; lean: "
            f"memory-lean autograd; chain: lean + recompute_hyper_connections)"
        )
        labels = list(table)
        width = max(len(label) for label in labels) + 2
        print(f"{'mode':20s}" + "".join(f"{label:>{width}s}" for label in labels))
        for mode in MODES:
            cells = (
                f"{table[label][mode]:{width}.2f}" if mode in table[label] else f"{'-':>{width}s}"
                for label in labels
            )
            print(f"{mode:20s}" + "".join(cells))

    for label, units in table.items():
        for mode, saved in units.items():
            if mode.startswith("none"):
                continue
            reference = units[_reference_mode(mode)]
            assert saved < reference, (
                f"{label}: {mode} keeps {saved:.2f} units per layer, no recompute {reference:.2f}"
            )
        if "full-uniform-1" in units:
            # Full recompute keeps only each checkpointed chunk's input: the n-stream state.
            n = 1 if label == "residual" else 4
            assert units["full-uniform-1"] == pytest.approx(n), (label, units["full-uniform-1"])
            assert units["full-uniform-2"] == pytest.approx(n / 2), (label, units["full-uniform-2"])


def test_recompute_with_the_default_causal_mask() -> None:
    """attention_mask=None (what the other tests pass) under full recompute: megatron's
    get_default_causal_mask uses device="cuda" and runs again in the backward pass, where
    cpu_compat's torch function mode is not active (autograd does not carry it into backward)."""
    model = _build("DHCx4", "lean", "full-uniform-1")
    batch = lm_batch(seed=3)
    loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
