"""A normal install works: build an sdist and a wheel from a copy of the tree, install the
wheel into a fresh virtual environment with no source tree on the path, and use it.

Editable installs (the README's test command) hide packaging mistakes: a hand-written
package list once shipped a wheel without hybridfast/training and hybridfast/study.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "csrc", "kernels", "hybridfast"]
COMMANDS = [["--help"], ["train", "--help"], ["evaluate", "--help"], ["study", "--help"],
            ["demo", "--help"], ["data", "--help"], ["models", "list"], ["info"]]


def _subpackages():
    """Every folder of hybridfast/ holding an __init__.py, as a dotted name."""
    return sorted(".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hybridfast").rglob("__init__.py"))


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    pytest.importorskip("build")
    pytest.importorskip("pybind11")
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for name in SHIPPED:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    # sdist first, then the wheel built from the unpacked sdist: a file missing from the
    # sdist breaks the wheel too.
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
                   check=True, capture_output=True, text=True)
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return wheel, sdist


@pytest.fixture(scope="module")
def installed(dist, tmp_path_factory):
    """A fresh venv that sees this environment's dependencies (torch, transformers, ...)
    through a plain path entry, so neither the editable install nor the checkout is visible."""
    wheel, _ = dist
    env_dir = tmp_path_factory.mktemp("venv")
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # a plain directory line: .pth files inside it (the editable finder) are not processed
    Path(site, "outer_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True, text=True)
    bin_dir = env_dir / "bin"
    return py, bin_dir, Path(site)


def test_wheel_holds_every_subpackage_and_the_kernels(dist):
    wheel, _ = dist
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in _subpackages():
        assert package.replace(".", "/") + "/__init__.py" in names, f"{package} missing from the wheel"
    assert "hybridfast/kernels/contrastive.py" in names
    assert any(n.startswith("hybridfast/_C") and n.endswith(".so") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "hybridfast = hybridfast.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_sdist_holds_the_sources(dist):
    _, sdist = dist
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for needed in ("csrc/hybrid_sampler.cpp", "csrc/hybrid_sampler.h", "csrc/bindings.cpp",
                   "kernels/contrastive.py", "setup.py", "pyproject.toml", "MANIFEST.in"):
        assert needed in names, f"{needed} missing from the sdist"


def test_installed_wheel_imports_everything_and_runs_the_cli(installed, tmp_path):
    py, bin_dir, site = installed
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    code = ("import importlib, hybridfast, hybridfast._C\n"
            f"for name in {_subpackages()!r}: importlib.import_module(name)\n"
            "import hybridfast.kernels.contrastive\n"
            "print(hybridfast.__file__)")
    res = subprocess.run([str(py), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()).resolve().is_relative_to(site.resolve()), res.stdout
    for args in COMMANDS:
        res = subprocess.run(["hybridfast", *args], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert res.returncode == 0, f"hybridfast {' '.join(args)}: {res.stderr[-2000:]}"
        assert res.stdout.strip()
