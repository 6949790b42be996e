"""A finished (or partial) study read back from its folder alone: results.json names the
settings, cells/*/*/result.json and per_query.npz hold every cell's numbers. Nothing is
trained, evaluated or fetched, so the tables can be recomputed anywhere from committed files
(docs/study/recompute.py)."""
import json
from dataclasses import fields
from pathlib import Path
from typing import List, Tuple

from hybridfast.study.cells import _load_result
from hybridfast.study.config import BASE, StudyConfig


def _belongs(cell_settings: dict, study_settings: dict) -> bool:
    """A cell is the study's when every setting it records equals the study's (an untouched
    model's cell records the evaluation settings only)."""
    return all(study_settings.get(k) == v for k, v in cell_settings.items())


def load_study(folder, **overrides) -> Tuple[StudyConfig, List[dict]]:
    """(config, cell results) of the study in `folder`, as its results.json describes it.

    overrides: StudyConfig fields to change (e.g. seeds=[0, 1] for the tables of the first two)."""
    folder = Path(folder)
    record = json.loads((folder / "results.json").read_text())
    settings = record["settings"]
    names = {f.name for f in fields(StudyConfig)}
    kwargs = {k: v for k, v in settings.items() if k in names and k != "extra_train"}
    kwargs.update(models=record["models"], modes=record["modes"], seeds=record["seeds"], out=str(folder),
                  extra_train=settings.get("extra_train", {}),
                  data_fingerprints={"evals": settings.get("eval_data"), "train": settings.get("train_data")})
    kwargs.update({k: record[k] for k in ("interval", "bootstrap", "include_base") if k in record})
    kwargs.update(overrides)
    config = StudyConfig(**kwargs)
    models = {str(m) for m in config.models}
    results = []
    for path in sorted(folder.glob("cells/*/*/result.json")):
        cell = json.loads(path.read_text())
        if cell["model"] not in models or not _belongs(cell["settings"], settings):
            continue
        if cell["mode"] != BASE and (cell["mode"] not in config.modes or cell["seed"] not in config.seeds):
            continue
        if cell["mode"] == BASE and not config.include_base:
            continue
        results.append(_load_result(path.parent))
    if not results:
        raise FileNotFoundError(f"{folder}: no cell of this study's settings under cells/")
    return config, results
