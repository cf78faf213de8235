"""moe_jax: DeepSeekMoE and its baselines in JAX/Flax NNX."""

from setuptools import find_packages, setup

setup(
    name="moe_jax",
    version="0.1.0",
    description="Mixture-of-Experts language models (DeepSeekMoE, GShard, Switch, Hash) in JAX/Flax NNX",
    packages=find_packages(include=["moe_jax", "moe_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "tensorstore",
        "gin-config",
        "numpy",
        "sentencepiece",
        "tqdm",
        "matplotlib",
        "safetensors",
        "tensorboardX",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "tensorboard", "ruff", "import-linter"],
        # seqio (and with it TensorFlow) is only needed to *build* the token cache.
        "data": ["seqio"],
        # torch (CPU build) + transformers: the `--format=transformers` export's tests load it with the real library.
        "hf": ["torch==2.13.0", "transformers>=5,<6"],
        # NVIDIA GPUs: jax's CUDA 12 plugin (with the CUDA libraries), at the jax version that was tested
        # (constraints.txt). `pip install -c constraints.txt -e '.[gpu]'`.
        "gpu": ["jax[cuda12]==0.10.2"],
        "gpu-cuda13": ["jax[cuda13]==0.10.2"],  # the same for a CUDA 13 driver stack
    },
    entry_points={"console_scripts": ["moe-jax=moe_jax.cli:main"]},
)
