"""Plot helpers for evaluation results (matplotlib, Agg backend: no display needed).

`annotated_heatmap` draws one labelled, annotated matrix on an axis and is
reusable for any language x language table; `map_heatmap` is the evaluator's
figure: the L x L mAP matrix, the multilingual (pooled) mAP column beside it and
the rank distance column (its own colour scale: lower is better).
"""
import math
from typing import Optional, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def annotated_heatmap(ax, values, row_labels: Sequence[str], col_labels: Sequence[str], *,
                      cmap="viridis", vmin=None, vmax=None, fmt="{:.2f}", title=None,
                      xlabel=None, ylabel=None, show_rows=True):
    """Draw `values` (list of rows, nan = no value) with each cell's number written in it."""
    import numpy as np

    data = np.array(values, dtype=float)
    if data.ndim != 2 or data.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"values must have shape ({len(row_labels)}, {len(col_labels)}), got {data.shape}")
    masked = np.ma.masked_invalid(data)
    finite = data[np.isfinite(data)]
    lo = vmin if vmin is not None else (finite.min() if finite.size else 0.0)
    hi = vmax if vmax is not None else (finite.max() if finite.size else 1.0)
    if hi <= lo:
        hi = lo + 1e-9
    im = ax.imshow(masked, cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
    ax.set_xticks(range(len(col_labels)), labels=list(col_labels))
    ax.set_yticks(range(len(row_labels)), labels=list(row_labels) if show_rows else [])
    ax.tick_params(top=True, bottom=False, labeltop=True, labelbottom=False)
    small = max(5, min(10, int(90 / max(1, max(data.shape)))))
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            v = data[i, j]
            if math.isnan(v):
                continue
            # black text on bright cells, white on dark ones (by the cell colour's luminance)
            r, g, b_, _ = im.cmap(im.norm(v))
            dark = 0.2126 * r + 0.7152 * g + 0.0722 * b_ < 0.5
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=small,
                    color="white" if dark else "black")
    if title:
        ax.set_title(title, fontsize=10, pad=26)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    return im


def map_heatmap(path, query_languages: Sequence[str], candidate_languages: Sequence[str], map_matrix,
                multi_map: Optional[Sequence[float]] = None, rank_distance: Optional[Sequence[float]] = None,
                title: str = "mAP", summary: Optional[str] = None):
    """Write a PNG: mAP per (query language row, candidate language column), the
    multilingual-pool mAP per query language, and its rank distance (lower is better)."""
    plt = _pyplot()
    L, M = len(query_languages), len(candidate_languages)
    extra = [x for x in (multi_map, rank_distance) if x is not None]
    widths = [max(M, 2)] + [1.4] * len(extra)
    fig, axes = plt.subplots(1, 1 + len(extra), figsize=(2.0 + 0.62 * (M + 2.2 * len(extra)), 1.8 + 0.5 * L),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    axes = axes[0]
    im = annotated_heatmap(axes[0], map_matrix, query_languages, candidate_languages, vmin=0.0, vmax=1.0,
                           title="mAP per language pair", xlabel="candidate language",
                           ylabel="query language")
    fig.colorbar(im, ax=axes[0], fraction=0.04, pad=0.02)
    i = 1
    if multi_map is not None:
        annotated_heatmap(axes[i], [[v] for v in multi_map], query_languages, ["all"], vmin=0.0, vmax=1.0,
                          title="multi-\nlingual\nmAP", show_rows=False)
        i += 1
    if rank_distance is not None:
        annotated_heatmap(axes[i], [[v] for v in rank_distance], query_languages, ["pool"], cmap="magma_r",
                          fmt="{:.0f}", title="rank\ndistance\n(lower:\nbetter)", show_rows=False)
    fig.suptitle(title if not summary else f"{title}\n{summary}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # path may be a BytesIO (EvaluationResult.save)
    plt.close(fig)
    return path
