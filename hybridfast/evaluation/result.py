"""EvaluationResult: what RetrievalEvaluator.evaluate returns, and how it is saved.

`save(out)` writes results.json, results.md and map_heatmap.png as one result (docs/evaluation.md):
* atomically: all three are rendered in memory and written to temporaries first
  (hybridfast.rules.atomic_write_many), so a full disk or an interrupt leaves the previous
  results byte-identical and no half-written file; the error names the path and says
  "no space left on device" when that is the cause;
* never over a user's files: OUT/.hybridfast-eval.json lists the names hybridfast wrote there
  (recorded before the files are); a results file not listed is the user's and is refused
  unless overwrite=True (`hybridfast evaluate --overwrite`).
"""
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Tuple

from hybridfast import rules
from hybridfast.evaluation.metrics import MULTI_METRICS

RESULT_FILES = ("results.json", "results.md", "map_heatmap.png")
OWNER_FILE = ".hybridfast-eval.json"


class ResultsNotSaved(OSError):
    """The results could not be written; earlier results in the folder are unchanged."""


def _pair_key(pair):
    return f"{pair[0]}->{pair[1]}"


def _nan_to_none(x):
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def _none_to_nan(x):
    if isinstance(x, dict):
        return {k: _none_to_nan(v) for k, v in x.items()}
    return float("nan") if x is None else x


@dataclass
class EvaluationResult:
    """What RetrievalEvaluator.evaluate returns.

    summary:      {"mono"|"cross"|"multi": {metric: value}}
    per_pair:     {(query_lang, candidate_lang): {metric: value}}
    per_language: {query_lang: {metric: value}} in the multilingual pool
    unk_rates:    {lang: fraction of [UNK] tokens} when the encoder has unk_rate(texts), else {}
    n_queries:    {"xx->yy" or "xx->multi": number of queries evaluated}
    per_query:    {"xx->yy" or "xx->multi": {query_id: {metric: value}}} when the evaluator
                  was built with keep_per_query=True (for significance tests), else {}
    """

    summary: Dict[str, Dict[str, float]]
    per_pair: Dict[Tuple[str, str], Dict[str, float]]
    per_language: Dict[str, Dict[str, float]]
    unk_rates: Dict[str, float] = field(default_factory=dict)
    query_languages: list = field(default_factory=list)
    candidate_languages: list = field(default_factory=list)
    n_queries: Dict[str, int] = field(default_factory=dict)
    benchmark: str = "benchmark"
    exact: bool = True
    config: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    per_query: Dict[str, Dict[str, Dict[str, float]]] = field(default_factory=dict)

    # ------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        """JSON-ready: pair keys as "xx->yy", nan as None."""
        return _nan_to_none({
            "benchmark": self.benchmark, "exact": self.exact,
            "query_languages": list(self.query_languages),
            "candidate_languages": list(self.candidate_languages),
            "summary": self.summary,
            "per_pair": {_pair_key(p): m for p, m in self.per_pair.items()},
            "per_language": self.per_language, "unk_rates": self.unk_rates,
            "n_queries": self.n_queries, "config": self.config, "timings": self.timings,
            **({"per_query": self.per_query} if self.per_query else {}),
        })

    def to_json_text(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False)

    def to_json(self, path) -> Path:
        """results.json alone, atomically (a reader or a full disk never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return rules.atomic_write_text(path, self.to_json_text())

    @classmethod
    def from_dict(cls, data: dict) -> "EvaluationResult":
        data = _none_to_nan(data)
        per_pair = {}
        for key, metrics in data["per_pair"].items():
            q, sep, c = key.partition("->")
            if not sep:
                raise ValueError(f"per_pair key {key!r} is not of the form 'xx->yy'")
            per_pair[(q, c)] = metrics
        return cls(summary=data["summary"], per_pair=per_pair, per_language=data.get("per_language", {}),
                   unk_rates=data.get("unk_rates", {}), query_languages=data.get("query_languages", []),
                   candidate_languages=data.get("candidate_languages", []),
                   n_queries=data.get("n_queries", {}), benchmark=data.get("benchmark", "benchmark"),
                   exact=data.get("exact", True), config=data.get("config", {}),
                   timings=data.get("timings", {}), per_query=data.get("per_query", {}))

    @classmethod
    def from_json(cls, path) -> "EvaluationResult":
        return cls.from_dict(json.loads(Path(path).read_text()))

    # ------------------------------------------------------------ views
    def map_matrix(self, metric="map"):
        """[query language][candidate language] list of lists (nan where a pair has no value)."""
        return [[self.per_pair.get((q, c), {}).get(metric, float("nan")) for c in self.candidate_languages]
                for q in self.query_languages]

    def to_markdown(self) -> str:
        def fmt(v, digits=4):
            return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"

        lines = [f"### {self.benchmark}: retrieval summary" + ("" if self.exact else " (approximate search)"),
                 "", "| setting | " + " | ".join(MULTI_METRICS) + " |",
                 "|---|" + "---:|" * len(MULTI_METRICS)]
        for setting, metrics in self.summary.items():
            cells = [fmt(metrics.get(m), 2 if m == "rank_distance" else 4) if m in metrics else ""
                     for m in MULTI_METRICS]
            lines.append(f"| {setting} | " + " | ".join(cells) + " |")
        if self.per_pair:
            cols = list(self.candidate_languages)
            head = ["query \\ candidate"] + cols
            if self.per_language:
                head += ["multi", "rank dist."]
            lines += ["", "mAP per language pair (rows: query language, columns: candidate language; "
                      "multi: the pool of all languages)", "",
                      "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
            for q, row in zip(self.query_languages, self.map_matrix()):
                cells = [fmt(v) for v in row]
                if self.per_language:
                    pl = self.per_language.get(q, {})
                    cells += [fmt(pl.get("map")), fmt(pl.get("rank_distance"), 1)]
                lines.append(f"| {q} | " + " | ".join(cells) + " |")
        for note in self.config.get("notes", []):
            lines += ["", f"Note: {note}."]
        if self.unk_rates:
            langs = sorted(self.unk_rates)
            lines += ["", "[UNK] token rate per language", "", "| " + " | ".join(langs) + " |",
                      "|" + "---:|" * len(langs),
                      "| " + " | ".join(f"{100 * self.unk_rates[l]:.1f}%" for l in langs) + " |"]
        return "\n".join(lines) + "\n"

    def plot(self, path) -> Path:
        """PNG heatmap of the L x L mAP matrix, the multilingual mAP and rank distance beside it
        (written atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return rules.atomic_write_bytes(path, self.plot_png())

    def plot_png(self) -> bytes:
        """The heatmap of `plot` as PNG bytes."""
        from hybridfast.evaluation.plots import map_heatmap

        multi = [self.per_language.get(q, {}).get("map", float("nan")) for q in self.query_languages] \
            if self.per_language else None
        rd = [self.per_language.get(q, {}).get("rank_distance", float("nan")) for q in self.query_languages] \
            if self.per_language else None
        parts = [f"{s} mAP {m['map']:.3f}" for s, m in self.summary.items() if "map" in m]
        buffer = io.BytesIO()
        map_heatmap(buffer, self.query_languages, self.candidate_languages, self.map_matrix(), multi, rd,
                    title=f"{self.benchmark}: mAP (rows: query language, columns: candidate language)",
                    summary=", ".join(parts))
        return buffer.getvalue()

    # ------------------------------------------------------------ saving
    def save(self, out, overwrite: bool = False) -> Dict[str, Path]:
        """Write results.json, results.md and map_heatmap.png into `out` as one result (module
        docstring) -> {file name: path}. Raises FileExistsError for a user's file (without
        overwrite) and ResultsNotSaved (an OSError, one line naming the path) when writing fails."""
        out = check_out_folder(out, overwrite)
        payload = {out / "results.json": self.to_json_text().encode("utf-8"),
                   out / "results.md": self.to_markdown().encode("utf-8"),
                   out / "map_heatmap.png": self.plot_png()}
        try:
            out.mkdir(parents=True, exist_ok=True)
            _own(out, RESULT_FILES)
            rules.atomic_write_many(payload)
        except OSError as e:
            raise ResultsNotSaved(e.errno, f"{rules.write_error_message(e, out)} (earlier results there, if "
                                           "any, are unchanged)") from None
        return {p.name: p for p in payload}


def _owned(out: Path) -> set:
    try:
        data = json.loads((out / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    entries = data.get("entries") if isinstance(data, dict) else None
    return set(entries) if isinstance(entries, list) else set()


def _own(out: Path, names) -> None:
    """Record `names` as hybridfast's in `out` before they are written (a crash in between leaves
    a record naming a file not there yet, which is harmless)."""
    owned = _owned(out)
    if not set(names) <= owned:
        rules.atomic_write_json(out / OWNER_FILE, {"written_by": "hybridfast evaluate",
                                                  "entries": sorted(owned | set(names))})


def check_out_folder(out, overwrite: bool = False) -> Path:
    """`out` if results may be saved there: a new folder, or one whose results files (if any)
    hybridfast wrote; a user's results.json / results.md / map_heatmap.png is refused unless
    overwrite. Call it before any work, so nothing is computed for a folder that is refused."""
    out = Path(out)
    rules.check_bool("overwrite", overwrite)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out: {out} exists and is not a folder")
    if overwrite or not out.is_dir():
        return out
    theirs = [n for n in RESULT_FILES if (out / n).exists() and n not in _owned(out)]
    if theirs:
        raise FileExistsError(f"out: {out} holds {', '.join(theirs)} not written by hybridfast; choose another "
                              "folder, or pass --overwrite (overwrite=True) to replace them")
    return out
