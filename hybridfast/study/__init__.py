"""`hybridfast study`: how does the benefit of hybrid batches change as the encoder grows?

For every model the study evaluates the untouched model (`base`) and, once per
training seed, one fine-tune per batch mode (mono, cross, hybrid: same data and
step budget), records total and non-embedding parameter counts, and reports each
(model, mode) as the mean over seeds with a 95% interval that includes test-query
noise and seed-to-seed variance (hybridfast.study.stats), plus hybrid's gain over
the better of mono and cross.

Default protocol: zero-shot (train on MLQA-R, evaluate on all 11 XQuAD-R languages);
`--protocol held-out` trains on XQuAD-R's train articles and evaluates on its test
articles. Default models: multilingual-e5-small cut to its first 3, 6 and 12 layers
(`multilingual-e5-small@K`, via hybridfast.models.get(name, layers=K)).

Modules: config (settings, model choices), identity (which model a cell holds,
parameter counts), cells (running and resuming the grid), stats (per-query values,
intervals), report (CSV, JSON, Markdown, plots), mpnet (all-mpnet-base-v2 from pip).
The command line is hybridfast/cli/study.py, generated from StudyConfig's fields.
"""
import os
from typing import Callable, Dict, List, Optional

from hybridfast.study.cells import (benchmark_fingerprint, build_evaluators, cell_dir, fingerprint_data, jsonable,
                                    plan, run_cell, run_cells, study_folder, subset_articles, write_json)
from hybridfast.study.config import (BASE, DEFAULT_MODELS, LOWER_IS_BETTER, METRIC_KEYS, MODES, PROTOCOLS, SETTINGS,
                                     TABLE_COLUMNS, ModelChoice, ModelSpec, StudyConfig, eval_split_for,
                                     prefix_kwargs, train_split_for)
from hybridfast.study.identity import (ResolvedModel, content_hash, parameter_counts, resolve_models)
from hybridfast.models.mpnet import assemble_mpnet
from hybridfast.study.report import (CSV_COLUMNS, STUDY_RESULTS, best_marks, result_rows, study_markdown,
                                     summarize, write_outputs)
from hybridfast.study.stats import (contrast_interval, macro_map, paired_bootstrap, per_query_values,
                                    question_weights)



def model_label(name: str) -> str:
    """Readable label of one model argument (the demo's header) without fetching anything: a folder
    by its name (the bundled MiniLM as all-MiniLM-L6-v2), a named model as given. The study itself
    labels models with resolve_models, which keeps labels unique."""
    spec = ModelChoice.parse(str(name))
    if spec.layers is None and os.path.isdir(spec.name):
        return resolve_models([spec])[0].label
    return str(spec)


def run_study(config: StudyConfig, train_fn: Optional[Callable] = None, evaluators: Optional[Dict] = None,
              log=print) -> List[dict]:
    """run_cells, then write results.csv/.json/.md and the plots under config.out (the folder
    locked and its result names claimed first: a user's results.* there stop the study at once)."""
    with study_folder(config.out, STUDY_RESULTS, config.overwrite):
        results = run_cells(config, train_fn=train_fn, evaluators=evaluators, log=log)
        write_outputs(config, results)
    return results
