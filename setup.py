"""paci-megatron: asynchronous, bubble-free pipeline parallelism (PACI) for NVIDIA Megatron."""

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# paci_megatron.pth goes to the top of site-packages, where Python runs it at start-up:
# it activates the Megatron-LM glue only when "--pipeline-schedule" is on the command
# line (or PACI_MEGATRON_CPU is set); see paci_megatron/hook.py.
PTH = "paci_megatron.pth"
VERSIONS: dict = {}  # paci_megatron/versions.py, the one statement of the supported releases
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "paci_megatron", "versions.py"),
          encoding="utf-8") as _f:
    exec(_f.read(), VERSIONS)


class build_py_with_pth(build_py):
    """build_py that also places paci_megatron.pth at the root of the built tree."""

    def run(self):
        super().run()
        self.copy_file(os.path.join("paci_megatron", PTH), os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


setup(
    name="paci-megatron",
    version="0.1.0",
    description="PACI: bubble-free asynchronous pipeline parallelism for Megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["paci_megatron", "paci_megatron.*"]),
    package_data={"paci_megatron": [PTH]},
    cmdclass={"build_py": build_py_with_pth},
    entry_points={"console_scripts": ["paci-megatron=paci_megatron.cli:main"]},
    install_requires=[
        "torch>=2.1",
        VERSIONS["MEGATRON_CORE_REQUIREMENT"],
        "numpy",
    ],
    extras_require={
        # the example recipes' data preparation (examples/gpt_recipe/data.py)
        "examples": ["tokenizers>=0.15"],
        "test": ["pytest>=7", "pytest-timeout>=2.1", "matplotlib>=3.5", "tokenizers>=0.15"],
        "plot": ["matplotlib>=3.5"],
        # megatron-core's Muon; also: pip install --no-deps --ignore-requires-python
        # emerging-optimizers==0.3.0 (it declares Python >= 3.12 but runs on 3.10+)
        "muon": ["absl-py", "triton"],
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        # what Megatron-LM's training package imports at start-up besides megatron-core
        "megatron-lm": ["six", "regex", "pyyaml", "pydantic", "psutil", "triton"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
