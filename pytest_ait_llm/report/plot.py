"""A picture of the error along the model: where it appears, and where it only propagates.

One point per compared tensor pair, in execution order: ``1 - cosine similarity`` and the relative euclidean
distance on a log axis. A precision bug shows as a step up at the op that introduced it; breaches are drawn in
red and the first divergence (the root cause) is annotated beside the axes (a label inside them would hide the
data), and the x axis is ticked at each layer (top-level ATB op), so a person sees at a glance whether the error
grows slowly with depth (rounding) or jumps at one op (a bug), and in which layer.

matplotlib is optional and heavy: it is imported here, inside the function, and only through the object-oriented
Agg API (no pyplot, so no global figure state and no GUI backend).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

__all__ = ["layer_ticks", "plot_error_profile"]

#: Values at or below this are drawn at this floor (a log axis cannot show an exact match).
FLOOR = 1e-12
#: Up to this many pairs, each x tick is labelled with its ATB op folder name.
MAX_LABELLED_OPS = 40
#: At most this many layer ticks are labelled (every k-th layer beyond it).
MAX_LAYER_TICKS = 30
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


def layer_ticks(rows: list) -> tuple[list[int], list[str]]:
    """(x, label) at the first pair of each layer, per token: a layer is a top-level ATB op that holds other ops
    (``6_LlamaLayer`` -> label ``6``). Thinned to at most :data:`MAX_LAYER_TICKS` labels."""
    ops = [getattr(r, "atb_op", "") or "" for r in rows]
    layers = {op.split("/", 1)[0] for op in ops if "/" in op}
    xs: list[int] = []
    labels: list[str] = []
    previous = None
    for i, (row, op) in enumerate(zip(rows, ops)):
        top = op.split("/", 1)[0]
        key = (getattr(row, "token_id", None), top)
        if top in layers and key != previous:
            xs.append(i)
            labels.append(top.split("_", 1)[0])
        previous = key
    step = max(1, math.ceil(len(xs) / MAX_LAYER_TICKS))
    return xs[::step], labels[::step]


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
    fig = Figure(figsize=(12, 4.4), dpi=100)
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
            ax.axvline(first, color="darkred", linestyle="--", linewidth=0.8, zorder=1)
            ax.scatter([first], [y], s=160, facecolors="none", edgecolors="darkred", linewidths=1.6, zorder=4,
                       label="first divergence")
            # named beside the axes, under the legend: a label inside them would hide the data
            label = f"first divergence:\n{_short(row.atb_op or row.atb_op_name, 36)}\n↔ {_short(row.torch_module, 36)}"
            ax.text(1.02, 0.5, label, transform=ax.transAxes, fontsize=8, color="darkred", ha="left", va="top",
                    bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "darkred"})
        ax.set_yscale("log")
        finite = [v for v in red + one_minus_cos if not math.isnan(v)]
        if finite:
            ax.set_ylim(min(finite) / 10, max(finite) * 30)
        ax.set_xlim(-0.5, len(rows) - 0.5)
        layer_x, layer_labels = layer_ticks(rows)
        if len(rows) <= MAX_LABELLED_OPS:
            ax.set_xticks(xs)
            ax.set_xticklabels([_short("/".join((r.atb_op or r.atb_op_name).split("/")[-2:]), 32) for r in rows],
                               rotation=35, ha="right", fontsize=7)
            ax.set_xlabel("ATB op, in execution order")
        elif layer_x:
            ax.set_xticks(layer_x)
            ax.set_xticklabels(layer_labels, fontsize=7)
            ax.set_xlabel("layer (id of the top-level ATB op), in execution order")
            for x in layer_x:
                ax.axvline(x - 0.5, color="0.85", linewidth=0.6, zorder=0)
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
