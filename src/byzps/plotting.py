"""PNG plots of metrics files and grid results (matplotlib, Agg backend; optional extra
``byzps[plot]``).

    plot_metrics(["runs/x/metrics.jsonl"], "out.png")     # accuracy and loss per round
    plot_curves({"mean / alie": records, ...}, "curves.png", title="f = 3")
    plot_heatmap(rows, cols, values, "heat.png")            # e.g. rule x attack accuracy

Every function raises :class:`PlottingUnavailable` (with the install command) when matplotlib is
missing, and ``ValueError`` when there is nothing to plot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from byzps.metrics import iter_jsonl


class PlottingUnavailable(RuntimeError):
    """matplotlib is not installed; the message says how to install it."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlottingUnavailable("plotting needs matplotlib: pip install 'byzps[plot]' (or "
                                  "pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if v is not None and isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(int(r["round"]) + 1)
            ys.append(float(v))
    return xs, ys


def plot_metrics(paths: Sequence[str | Path], out: str | Path,
                 labels: Optional[Sequence[str]] = None) -> Path:
    """Test accuracy (left) and reported training loss / test loss (right) per round.

    Args:
        paths: metrics JSON Lines files (:func:`byzps.metrics.round_record` layout); one line
            per file in each panel.
        out: PNG path (parent folders created); an existing folder gets ``curves.png``
            in it, a name without a suffix gets ``.png`` (the path returned is the one
            written).
        labels: legend labels (default: each file's parent folder name).

    Returns:
        the path of the PNG written.

    Raises:
        ValueError: no file holds any round.
        byzps.safeio.FileRefused: a file is not a regular file, is larger than
            :data:`byzps.metrics.MAX_METRICS_BYTES` or has a line longer than
            :data:`byzps.metrics.MAX_RECORD_BYTES` (the message names it; a ValueError).
        PlottingUnavailable: no matplotlib.
        OSError: a file cannot be read.
    """
    # only the plotted keys of each record are kept: memory grows with rounds, not with n
    keys = ("round", "test_accuracy", "reported_loss", "test_loss")
    runs = [(str(labels[k]) if labels else Path(p).parent.name or str(p),
             list(iter_jsonl(p, keys))) for k, p in enumerate(paths)]
    if not any(recs for _, recs in runs):
        raise ValueError(f"no round records in {', '.join(map(str, paths))}")
    plt = _pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for label, recs in runs:
        xs, ys = _series(recs, "test_accuracy")
        if xs:
            ax_acc.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=label)
        xs, ys = _series(recs, "reported_loss")
        if xs:
            ax_loss.plot(xs, ys, alpha=0.6, label=f"{label} (train, reported)")
        xs, ys = _series(recs, "test_loss")
        if xs:
            ax_loss.plot(xs, ys, ls="--", marker="o" if len(xs) < 30 else None, ms=3,
                         label=f"{label} (test)")
    ax_acc.set(xlabel="round", ylabel="test accuracy", title="test accuracy")
    ax_acc.grid(alpha=0.3)
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title="loss")
    ax_loss.grid(alpha=0.3)
    for ax in (ax_acc, ax_loss):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(fig, out, plt)


def plot_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]], out: str | Path,
                title: str = "", key: str = "test_accuracy") -> Path:
    """One line per labelled run of ``key`` (default test accuracy) against the round.

    Raises:
        ValueError: no run has a value of ``key``.
        PlottingUnavailable: no matplotlib.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for label, recs in curves.items():
        xs, ys = _series(recs, key)
        if xs:
            ax.plot(xs, ys, label=label)
            drawn += 1
    if not drawn:
        plt.close(fig)
        raise ValueError(f"no {key} values to plot")
    ax.set(xlabel="round", ylabel=key.replace("_", " "), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2 if drawn > 8 else 1)
    return _save(fig, out, plt)


def plot_heatmap(rows: Sequence[str], cols: Sequence[str],
                 values: Sequence[Sequence[Optional[float]]], out: str | Path,
                 title: str = "", vmin: float = 0.0, vmax: float = 1.0) -> Path:
    """A ``len(rows) x len(cols)`` heatmap with each cell's value written in it (None = blank).

    Raises:
        ValueError: ``values`` does not have the shape of rows x cols, or is empty.
        PlottingUnavailable: no matplotlib.
    """
    if not rows or not cols or len(values) != len(rows) or any(len(v) != len(cols)
                                                              for v in values):
        raise ValueError(f"heatmap values must be {len(rows)} x {len(cols)} and non-empty")
    plt = _pyplot()
    grid = [[math.nan if v is None else float(v) for v in row] for row in values]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(cols), 0.9 + 0.45 * len(rows)))
    im = ax.imshow(grid, vmin=vmin, vmax=vmax, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), labels=list(cols), rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), labels=list(rows), fontsize=8)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=7,
                        color="white" if v < (vmin + vmax) / 2 else "black")
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    return _save(fig, out, plt)


def _save(fig, out: str | Path, plt) -> Path:
    out = Path(out)
    if out.is_dir():
        out = out / "curves.png"
    elif not out.suffix:   # matplotlib would add .png itself: return the real name
        out = out.with_name(out.name + ".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
