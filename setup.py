from pathlib import Path

from setuptools import find_packages, setup

HF = ["transformers>=4.51", "peft>=0.15", "tokenizers>=0.21", "gguf>=0.10"]
SERVE = ["fastapi>=0.110", "uvicorn>=0.29"]

setup(
    name="minillm",
    version="0.1.0",
    description="Train small language models end to end, from scratch, in PyTorch and Triton",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The top-level folder kernels/ installs as minillm.kernels, never as a top-level `kernels`
    # (a different PyPI package, which transformers uses). minillm/__init__.py maps it the same
    # way when minillm runs from a source checkout that was not installed.
    packages=find_packages(include=["minillm", "minillm.*"]) + ["minillm.kernels"],
    package_dir={"minillm.kernels": "kernels"},
    package_data={"minillm": ["assets/*.model", "static/*"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "sentencepiece>=0.2",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tensorboard>=2.14",
        "pyyaml>=6.0",
        "tqdm>=4.60",
    ],
    extras_require={
        # to and from transformers / PEFT / GGUF (scripts/convert_model.py, --init_from an HF folder);
        # never imported on the training path
        "hf": HF,
        # the test suite checks export and import against these, the server with the official openai
        # client, the chat page in a real browser (selenium driving the system's chromium), and the
        # preference and reward losses against TRL's own (CPO/ORPO live in trl.experimental since 0.26)
        "dev": ["pytest>=7", *HF, *SERVE, "openai>=1.30", "httpx>=0.27", "selenium>=4.20", "trl>=0.26"],
        # serve_openai_api.py: the OpenAI-compatible server and its chat page
        "serve": SERVE,
    },
)
