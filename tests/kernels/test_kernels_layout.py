"""kernels/ is shipped as hybridfast.kernels, imports from a plain checkout, and never shadows
the PyPI package named `kernels` (Hugging Face's kernel hub)."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _python(code, cwd):
    run = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip()


def _checkout(tmp_path):
    """A plain checkout: the package folders, no install."""
    root = tmp_path / "checkout"
    root.mkdir()
    shutil.copytree(ROOT / "hybridfast", root / "hybridfast", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copytree(ROOT / "kernels", root / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_plain_checkout_imports_hybridfast_kernels(tmp_path):
    root = _checkout(tmp_path)
    out = _python(f"import sys; sys.path.insert(0, {str(root)!r}); import hybridfast.kernels.contrastive as c; "
                  "print(c.__file__)", cwd=tmp_path)
    assert Path(out) == root / "kernels" / "contrastive.py"


def test_checkout_on_path_does_not_shadow_the_pypi_kernels_package(tmp_path):
    root = _checkout(tmp_path)
    other = tmp_path / "site"
    (other / "kernels").mkdir(parents=True)
    (other / "kernels" / "__init__.py").write_text("__version__ = '0.9.0'\nWHO = 'pypi'\n")
    # the checkout comes FIRST on sys.path, as with `python -m ...` run from the repository root
    out = _python(f"import sys; sys.path[:0] = [{str(root)!r}, {str(other)!r}]; import kernels; print(kernels.WHO)",
                  cwd=tmp_path)
    assert out == "pypi"
    # without any `kernels` installed, transformers' availability check must not take ours for it
    import importlib.util

    if importlib.util.find_spec("kernels") is not None:
        return  # a real `kernels` is installed here: the first half already showed it wins
    out = _python(f"import sys; sys.path.insert(0, {str(root)!r}); "
                  "from transformers.utils.import_utils import _is_package_available; "
                  "print(_is_package_available('kernels', return_version=True)[0])", cwd=tmp_path)
    assert out == "False"
