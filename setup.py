"""Build and install curvsafe.

``kernels/`` is installed as ``curvsafe.kernels`` (package_dir), so nothing installs a top-level ``kernels``.
The C++ CPU kernels (``csrc/``) are compiled with torch.utils.cpp_extension and ninja when torch is importable at
build time (``pip install --no-build-isolation``, as ``make test`` does); otherwise they are JIT-compiled on
first use from a source checkout, or the PyTorch reference path is used. torch is required as a range that an
existing torch (CPU or CUDA build) satisfies, so the install never replaces it.
"""

import os
import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "curvsafe" / "_version.py").read_text()).group(1)


def cpp_extension():
    """The CppExtension and its build command, or nothing when torch is unavailable at build time."""
    if os.environ.get("CURVSAFE_NO_CPP") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    ext = CppExtension("curvsafe.kernels._C", sources=["csrc/curvsafe_kernels.cpp"],
                       extra_compile_args={"cxx": ["-O3", "-fopenmp"]}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cpp_extension()
INSTALL_REQUIRES = ["torch>=2.3", "transformers>=4.45", "peft>=0.12", "accelerate", "safetensors", "tqdm", "numpy",
                    "scipy", "matplotlib"]
# the test extra is requirements-test.txt (what `make test` installs) beyond the runtime requirements
TEST_REQUIRES = [line.strip() for line in (ROOT / "requirements-test.txt").read_text().splitlines()
                 if line.strip() and not line.startswith("#") and line.strip() not in INSTALL_REQUIRES]

setup(
    name="curvsafe",
    version=VERSION,
    description="Curvature-aware safety restoration for fine-tuned LLMs (K-FAC, EK-FAC, L-BFGS, CG)",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["curvsafe", "curvsafe.*"]) + ["curvsafe.kernels"],
    package_dir={"curvsafe.kernels": "kernels"},
    install_requires=INSTALL_REQUIRES,
    extras_require={"triton": ["triton>=3.0"], "test": TEST_REQUIRES},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["curvsafe=curvsafe.cli:main"]},
)
