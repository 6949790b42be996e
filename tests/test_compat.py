"""Old module paths (before the subpackages) keep working for one release, with a warning."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import hybridfast

PACKAGE = Path(hybridfast.__file__).parent


@pytest.mark.parametrize("old,new", sorted(hybridfast.MOVED_MODULES.items()))
def test_old_path_is_the_new_module_and_warns(old, new):
    # a fresh interpreter: the warning is raised on the first import only
    code = ("import importlib, warnings\n"
            "with warnings.catch_warnings(record=True) as seen:\n"
            "    warnings.simplefilter('always')\n"
            f"    old = importlib.import_module({old!r})\n"
            f"assert old is importlib.import_module({new!r}), 'not the same module object'\n"
            "msgs = [str(w.message) for w in seen if issubclass(w.category, DeprecationWarning)]\n"
            f"assert any({new!r} in m and {old!r} in m for m in msgs), msgs\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_from_import_and_attribute_access_of_an_old_path(monkeypatch):
    # forget an earlier import of the old name in this process, so the warning is seen again
    monkeypatch.delitem(sys.modules, "hybridfast.search", raising=False)
    monkeypatch.delattr(hybridfast, "search", raising=False)
    with pytest.warns(DeprecationWarning, match="hybridfast.evaluation.search"):
        from hybridfast import search  # noqa: F401
    from hybridfast.evaluation import search as new
    assert search is new
    from hybridfast.train_data import load_training_pairs
    from hybridfast.data import load_training_pairs as front_door
    assert load_training_pairs is front_door


def _imported_names(path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant):
            yield node.args[0].value


def test_library_code_imports_no_old_path():
    offenders = [f"{p.relative_to(PACKAGE.parent)}: {name}" for p in PACKAGE.rglob("*.py")
                 for name in _imported_names(p) if name in hybridfast.MOVED_MODULES]
    assert offenders == []
