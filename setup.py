from setuptools import find_packages, setup

setup(
    name="gem_fast",
    version="0.1.0",
    description="Fused Triton vocab kernels and a training engine for GEM and group-based RLHF",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["gem_fast", "gem_fast.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0",
        "triton==3.9.0",
        "transformers==5.23.0",
        "accelerate==1.15.0",
        "safetensors",
        "gguf>=0.10",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "pyarrow",
    ],
    extras_require={
        "test": ["pytest==9.2.0", "pytest-benchmark==5.3.1"],
        "flash": ["flash-attn"],
        "peers": ["liger-kernel==0.8.5", "cut-cross-entropy"],
    },
)
