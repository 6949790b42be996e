"""Every public name the README shows imports from the path it is shown with."""
import importlib
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _imports():
    found = []
    for block in _python_blocks():
        statements = re.findall(r"^from ([\w.]+) import \(([^)]*)\)", block, flags=re.M)
        statements += re.findall(r"^from ([\w.]+) import ([^(\n]+)$", block, flags=re.M)
        for module, names in statements:
            for name in re.split(r"[,\s]+", names.split("#")[0].strip()):
                if name:
                    found.append((module, name))
    return found


def test_readme_shows_imports():
    names = {name for _, name in _imports()}
    assert {"HybridContrastiveLoss", "HybridBatchSampler", "Encoder", "RetrievalEvaluator",
            "load_benchmark", "load_training_pairs", "HybridSentenceTransformerTrainer"} <= names


@pytest.mark.parametrize("module,name", _imports())
def test_readme_import_resolves(module, name):
    if module.startswith(("sentence_transformers", "hybridfast.integrations")):
        pytest.importorskip("sentence_transformers")
    if not module.startswith("hybridfast"):
        pytest.importorskip(module.split(".")[0])
    assert hasattr(importlib.import_module(module), name), f"from {module} import {name}"
