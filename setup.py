"""paci-megatron: asynchronous, bubble-free pipeline parallelism (PACI) for NVIDIA Megatron."""

from setuptools import find_packages, setup

setup(
    name="paci-megatron",
    version="0.1.0",
    description="PACI: bubble-free asynchronous pipeline parallelism for Megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["paci_megatron", "paci_megatron.*"]),
    install_requires=[
        "torch>=2.1",
        "megatron-core>=0.14,<0.20",
        "numpy",
        "tokenizers>=0.15",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2.1", "matplotlib>=3.5"],
        "plot": ["matplotlib>=3.5"],
        "gpu": ["transformer-engine[pytorch]>=2.0"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
