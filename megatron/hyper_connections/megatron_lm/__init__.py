"""Hyper-connections in Megatron-LM's own trainer, ``megatron.training``.

``megatron.training`` comes with megatron-core >= 0.17 (``pip install "megatron-core[mlm]"``
adds its dependencies) or with a Megatron-LM checkout on ``PYTHONPATH``.

- ``pretrain_gpt``: the entry point, Megatron-LM's GPT pretraining with the HC flags added
  (``python -m megatron.hyper_connections.megatron_lm.pretrain_gpt`` or
  ``megatron-hc-pretrain-gpt``).
- ``arguments``: the HC flags in Megatron-LM's parser, and the config built from its arguments.
- ``model``: the GPT: Megatron-LM's choice of layer specs, the package's ``GPTModel``.
- ``checkpointing``: a ``--load`` checked against the run's HC flags before any tensor is read;
  a residual checkpoint starts an HC model.
- ``monitoring``: the stability metrics in Megatron-LM's TensorBoard and W&B.

The names below are what a patched ``pretrain_gpt.py`` of a Megatron-LM checkout calls (see
``patches/`` in the repository).
"""

import importlib
import importlib.util

if importlib.util.find_spec("megatron.training") is None:
    raise ImportError(
        "megatron.hyper_connections.megatron_lm needs Megatron-LM's trainer, megatron.training: "
        "install megatron-core >= 0.17 (pip install 'megatron-core[mlm]>=0.17,<0.20', Python "
        ">= 3.12) or put a Megatron-LM checkout on PYTHONPATH"
    )

_EXPORTS = {
    "GPTModel": "model",
    "gpt_builder": "model",
    "extra_args_provider": "arguments",
    "transformer_config": "arguments",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*globals(), *__all__]
