"""Builds hybridfast._C from csrc/ (pybind11, plain C++17: no torch ABI) and ships
kernels/ as the subpackage hybridfast.kernels. Metadata lives in pyproject.toml."""
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext_modules = [
    Pybind11Extension(
        "hybridfast._C",
        sorted(glob("csrc/*.cpp")),
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
]

setup(
    # Discovered, never listed by hand: a hand list once left training/ and study/ out of
    # the wheel (tests/test_wheel.py builds and installs one to keep it that way).
    packages=find_packages(include=["hybridfast", "hybridfast.*"]) + ["hybridfast.kernels"],
    package_dir={"hybridfast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
