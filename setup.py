"""Build script: the pure-Python package plus the optional C++/OpenMP extension ``msa_fast._C``.

The extension is built with torch's CppExtension + BuildExtension (ninja). If the build fails (no compiler,
MSA_FAST_NO_EXT=1) the package still installs and runs on the PyTorch backends; ``msa_fast`` says so once.
"""
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
packages = find_packages(include=["msa_fast", "msa_fast.*"]) + ["msa_fast.kernels"]
package_dir = {"msa_fast": "msa_fast", "msa_fast.kernels": "kernels"}

ext_modules, cmdclass = [], {}
if os.environ.get("MSA_FAST_NO_EXT", "0") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension

        sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
        if sources:
            omp = [] if sys.platform == "darwin" else ["-fopenmp"]
            # Tuned for the build host (AVX2/FMA/AVX-512 where present): the extension is built from source on the
            # machine that runs it. MSA_FAST_PORTABLE=1 builds a generic x86-64 binary instead.
            arch = [] if os.environ.get("MSA_FAST_PORTABLE", "0") == "1" else ["-march=native"]
            ext_modules.append(
                CppExtension(
                    "msa_fast._C",
                    sources,
                    extra_compile_args={"cxx": ["-O3", "-std=c++17", "-ffast-math", "-fno-finite-math-only", *arch, *omp]},
                    extra_link_args=omp,
                )
            )
            cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
    except ImportError:  # torch missing at build time: pure-Python install
        print("msa_fast: torch not importable at build time, skipping the C++ extension", file=sys.stderr)

setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)
