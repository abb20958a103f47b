"""Pretraining entry point: a GPT with hyper-connections (HC, mHC) on megatron-core.

- ``pretrain``: the training loop (``python -m megatron.hyper_connections.training.pretrain``,
  ``torchrun ... -m megatron.hyper_connections.training.pretrain``, or ``megatron-hc-pretrain``).
- ``parser``: Megatron-LM's command-line flags, their defaults and value types.
- ``checks``: ``parse_args``, the flags checked before anything starts.
- ``factories``: the tokenizer, megatron-core configs, model and optimizer built from them.
- ``checkpoints``: the trainer's checkpoint layout, save and resume.
- ``distributed``: the process group and megatron's parallel state (and, without CUDA, the
  package's CPU layer, ``cpu_compat``).
- ``monitoring``: the stability of the residual mixing (gains of H_res and of its products over
  depth) and the usual training scalars, to the console, TensorBoard, JSONL and W&B.
"""
