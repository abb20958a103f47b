"""Hyper-Connections (HC, mHC, Frac-Connections) for megatron-core.

Installs ``megatron.hyper_connections`` into the ``megatron`` namespace package beside
``megatron.core``; there is deliberately no ``megatron/__init__.py``.
"""

import re
from pathlib import Path

from setuptools import find_namespace_packages, setup

README = Path(__file__).with_name("README.md")
# The version is declared once, in the package.
INIT = Path(__file__).with_name("megatron") / "hyper_connections" / "__init__.py"
VERSION = re.search(r'^__version__ = "([^"]+)"', INIT.read_text(encoding="utf-8"), re.M)[1]

setup(
    name="megatron-hyper-connections",
    version=VERSION,
    description="Hyper-Connections and Manifold-Constrained Hyper-Connections for megatron-core",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_namespace_packages(
        include=["megatron.hyper_connections", "megatron.hyper_connections.*"]
    ),
    install_requires=[
        # Install torch before this package: a bare requirement on a machine without torch
        # pulls the CUDA build from the registry.
        "torch>=2.4",
        # 0.15 and 0.16 run on Python >= 3.10, 0.17 to 0.19 on Python >= 3.12; 0.20 brings a
        # TransformerConfig with hyper-connection fields of its own (see config.py).
        "megatron-core>=0.15,<0.20",
        # megatron-core's distributed checkpoint writer needs it and does not declare it.
        "psutil",
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]>=2.0"],
        # GPT-2 BPE and Hugging Face tokenizer.json files (the byte tokenizer needs nothing).
        "data": ["tokenizers>=0.19"],
        # TensorBoard logging of the pretraining entry point (wandb is used when installed).
        "train": ["tensorboard>=2.14"],
        # tools/plot_stability.py and tools/demo.py (PNG figures).
        "plots": ["matplotlib>=3.8"],
        # Megatron-LM's trainer (megatron.hyper_connections.megatron_lm): megatron.training
        # ships with megatron-core >= 0.17, whose `mlm` extra brings what it imports.
        "megatron-lm": ['megatron-core[mlm]>=0.17,<0.20; python_version >= "3.12"'],
        # Fused kernels (hyper_connections_fused_kernels); CUDA builds of torch bring it.
        "triton": ["triton>=3.0"],
        "dev": [
            "pytest>=8",
            # The kernels' tests run on CPU in Triton's interpreter.
            'triton>=3.0; platform_system == "Linux"',
            "ruff>=0.6",
            "tokenizers>=0.19",
            "tensorboard>=2.14",
            "matplotlib>=3.8",
        ],
    },
    entry_points={
        "console_scripts": [
            "megatron-hc-pretrain = megatron.hyper_connections.training.pretrain:main",
            "megatron-hc-pretrain-gpt = megatron.hyper_connections.megatron_lm.pretrain_gpt:main",
        ],
    },
)
