"""A picture of the error along the model: where it appears, and where it only propagates.

One point per compared tensor pair, in execution order: ``1 - cosine similarity`` and the relative euclidean
distance on a log axis. A precision bug shows as a step up at the op that introduced it; breaches are drawn in
red and the first divergence (the root cause) is annotated, so a person sees at a glance whether the error grows
slowly with depth (rounding) or jumps at one op (a bug).

matplotlib is optional and heavy: it is imported here, inside the function, and only through the object-oriented
Agg API (no pyplot, so no global figure state and no GUI backend).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

__all__ = ["plot_error_profile"]

#: Values at or below this are drawn at this floor (a log axis cannot show an exact match).
FLOOR = 1e-12
#: Up to this many pairs, each x tick is labelled with its ATB op folder name.
MAX_LABELLED_OPS = 40
_COS = "cosine_similarity"
_RED = "relative_euclidean_distance"


def _value(row: Any, name: str) -> float:
    metrics = getattr(row, "metrics", None)
    values = getattr(metrics, "values", None) or {}
    try:
        value = float(values.get(name, math.nan))
    except (TypeError, ValueError):
        return math.nan
    return value


def _plottable(value: float) -> float:
    return math.nan if math.isnan(value) else max(value, FLOOR)


def _short(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


def plot_error_profile(result: Any, path: str | Path, *, title: str | None = None) -> Path:
    """Draw ``result``'s per-op error along execution order into the PNG file ``path``; returns ``path``.

    ``result`` is a :class:`~pytest_ait_llm.compare.result.CompareResult`. Rows without metrics (unpaired,
    skipped, unreadable) are left out. Token boundaries are drawn as dotted lines when several tokens were
    compared.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    rows = [r for r in result.rows if getattr(r, "metrics", None) is not None]
    fig = Figure(figsize=(10, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if not rows:
        ax.text(0.5, 0.5, "no compared op pairs", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        xs = list(range(len(rows)))
        one_minus_cos = [_plottable(1.0 - _value(r, _COS)) for r in rows]
        red = [_plottable(_value(r, _RED)) for r in rows]
        ax.plot(xs, red, marker="o", markersize=3, linewidth=1, color="tab:blue", label="relative euclidean distance")
        ax.plot(xs, one_minus_cos, marker="s", markersize=3, linewidth=1, color="tab:gray", alpha=0.8,
                label="1 − cosine similarity")
        breached = [i for i, r in enumerate(rows) if getattr(r, "breached", False)]
        if breached:
            ax.scatter([xs[i] for i in breached], [red[i] if not math.isnan(red[i]) else FLOOR for i in breached],
                       s=40, color="red", zorder=3, label="breach")
        tokens = [getattr(r, "token_id", None) for r in rows]
        if len(set(tokens)) > 1:
            for i in range(1, len(rows)):
                if tokens[i] != tokens[i - 1]:
                    ax.axvline(i - 0.5, color="black", linestyle=":", linewidth=0.8)
                    ax.annotate(f"token {tokens[i]}", (i - 0.5, 1.0), xycoords=("data", "axes fraction"),
                                fontsize=7, ha="left", va="top")
        first = next((i for i, r in enumerate(rows) if getattr(r, "first_divergence", False)), None)
        if first is not None:
            row = rows[first]
            y = red[first] if not math.isnan(red[first]) else FLOOR
            label = f"first divergence:\n{_short(row.atb_op or row.atb_op_name)}\n↔ {_short(row.torch_module)}"
            ax.annotate(label, (first, y), xytext=(0.55 if first < len(rows) / 2 else 0.05, 0.55),
                        textcoords="axes fraction", fontsize=8, color="darkred",
                        bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "darkred", "alpha": 0.9},
                        arrowprops={"arrowstyle": "->", "color": "darkred"})
        ax.set_yscale("log")
        finite = [v for v in red + one_minus_cos if not math.isnan(v)]
        if finite:
            ax.set_ylim(min(finite) / 10, max(finite) * 30)
        ax.set_xlim(-0.5, len(rows) - 0.5)
        if len(rows) <= MAX_LABELLED_OPS:
            ax.set_xticks(xs)
            ax.set_xticklabels([_short("/".join((r.atb_op or r.atb_op_name).split("/")[-2:]), 32) for r in rows],
                               rotation=35, ha="right", fontsize=7)
            ax.set_xlabel("ATB op, in execution order")
        else:
            ax.set_xlabel("op pair, in execution order")
        ax.set_ylabel("error (log)")
        ax.grid(True, which="major", axis="y", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    verdict = "passed" if getattr(result, "passed", True) else f"{len(result.breaches)} breach(es)"
    ax.set_title(title or f"per-op error along the model ({verdict})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # write beside and rename: a crash never leaves half a PNG, and a reader never sees one
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
