"""Rank heatmap (the paper's Figure 2): how the rank of every adapted matrix moves over the reallocation events.

This module owns [`plot_rank_history`] and the helpers that order module paths by layer depth and split a path into
(layer index, module type), which the model card's rank table reuses. It draws on a bare `matplotlib.figure.Figure`
with the Agg canvas, never through `pyplot`: no global figure state, no GUI backend, safe in worker threads and on
machines without a display.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

_INDEX_RE = re.compile(r"^\d+$")


def split_module_path(path: str) -> tuple[str, int | None, str]:
    """Split a module path at its first purely numeric component (the layer index).

    Args:
        path (`str`): e.g. `"model.layers.3.self_attn.q_proj"`.

    Returns:
        `tuple`: (prefix, layer index, rest), e.g. `("model.layers", 3, "self_attn.q_proj")`; a path without a
        numeric component gives `(path, None, path)`.
    """
    parts = path.split(".")
    for i, part in enumerate(parts):
        if _INDEX_RE.match(part):
            return ".".join(parts[:i]), int(part), ".".join(parts[i + 1 :]) or part
    return path, None, path


def short_module_types(rests: Sequence[str]) -> dict[str, str]:
    """Shortest trailing part of each module type that no other type ends with.

    Llama's `self_attn.q_proj` becomes `q_proj`; BERT's `attention.self.query` becomes `query`, while
    `attention.output.dense`, `intermediate.dense` and `output.dense` keep the components that tell them apart.

    Returns:
        `dict`: full type -> short label.
    """
    unique = list(dict.fromkeys(rests))
    split = {r: r.split(".") for r in unique}

    def tail(r: str, k: int) -> str:
        return ".".join(split[r][-k:])

    labels: dict[str, str] = {}
    for r in unique:
        k = 1
        while k < len(split[r]) and any(tail(u, k) == tail(r, k) for u in unique if u != r):
            k += 1
        labels[r] = tail(r, k)
    if len(set(labels.values())) != len(unique):  # cannot happen for distinct paths; keep the table correct anyway
        return {r: r for r in unique}
    return labels


def depth_order(names: Sequence[str]) -> list[str]:
    """Module paths sorted by layer depth: stacks (e.g. encoder, decoder) in order of first appearance, then by layer
    index, then by the given (model) order inside a layer. Sorting is stable, so model order breaks every tie."""
    group_rank: dict[str, int] = {}
    keys: dict[str, tuple[int, int, int]] = {}
    for pos, name in enumerate(names):
        prefix, index, _ = split_module_path(name)
        group = group_rank.setdefault(prefix, len(group_rank))
        keys[name] = (group, -1 if index is None else index, pos)
    return sorted(names, key=lambda n: keys[n])


def _ranks_of(entry: Any) -> dict[str, int]:
    """The rank map of one history record: its `"ranks"` (written by `FlexLoRACallback`), else `"rank_map"`, else
    the record itself when it is a plain module -> rank mapping."""
    if isinstance(entry, Mapping):
        for key in ("ranks", "rank_map"):
            if isinstance(entry.get(key), Mapping):
                return {str(k): int(v) for k, v in entry[key].items()}
        if entry and all(isinstance(v, int) and not isinstance(v, bool) for v in entry.values()):
            return {str(k): int(v) for k, v in entry.items()}
    raise ValueError(
        "plot_rank_history: a rank-history record must be a dict with a 'ranks' mapping (module path -> rank), "
        f"got {type(entry).__name__}: {str(entry)[:120]}"
    )


def _columns(history_or_model: Any) -> tuple[list[str], list[dict[str, int]]]:
    """(x labels, rank maps) for each column of the heatmap."""
    if hasattr(history_or_model, "rank_history") and hasattr(history_or_model, "rank_map"):
        history = list(history_or_model.rank_history)
        if not history:
            return ["current"], [dict(history_or_model.rank_map())]
    elif isinstance(history_or_model, Mapping):
        return ["current"], [_ranks_of(history_or_model)]
    elif isinstance(history_or_model, Sequence) and not isinstance(history_or_model, (str, bytes)):
        history = list(history_or_model)
        if not history:
            raise ValueError(
                "plot_rank_history: the rank history is empty; pass the model (its current rank map is drawn) "
                "or a rank map instead."
            )
    else:
        raise TypeError(
            "plot_rank_history expects a FlexLoRAModel, a rank history (list of dicts with 'ranks') or a rank map, "
            f"got {type(history_or_model).__name__}."
        )
    labels = [str(e.get("step", i)) if isinstance(e, Mapping) else str(i) for i, e in enumerate(history)]
    maps = [_ranks_of(e) for e in history]
    first = history[0]
    if isinstance(first, Mapping) and isinstance(first.get("prune"), list) and isinstance(first.get("expand"), list):
        # Undo the first event to show where training started (uniform r), as the paper's Figure 2 does.
        start = dict(maps[0])
        for name in first["expand"]:
            start[name] = start.get(name, 0) - 1
        for name in first["prune"]:
            start[name] = start.get(name, 0) + 1
        labels, maps = ["start", *labels], [start, *maps]
    return labels, maps


def plot_rank_history(
    history_or_model: Any, path: str | os.PathLike[str] | None = None, *, title: str | None = None
) -> Figure:
    """Draw the rank of every adapted matrix at every reallocation event as a heatmap (paper Figure 2).

    Rows are the adapted matrices sorted by layer depth, columns the events (labelled with their optimizer step),
    colour the rank after the event. With an empty history the current rank map is drawn as a single column.

    Args:
        history_or_model (`FlexLoRAModel`, `list[dict]` or `dict[str, int]`): a model (its `rank_history`, or its
            `rank_map()` when the history is empty), a rank history as recorded by `FlexLoRACallback` (records with
            `"step"` and `"ranks"`; with `"prune"` / `"expand"` lists a first "start" column shows the ranks
            before the first event), or a single rank map (module path -> rank).
        path (`str` or `os.PathLike`, *optional*): where to save the figure as PNG.
        title (`str`, *optional*): figure title; a default naming the total rank is used otherwise.

    Returns:
        `matplotlib.figure.Figure`: the figure (not registered with `pyplot`, so nothing needs closing).
    """
    import matplotlib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import BoundaryNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    labels, maps = _columns(history_or_model)
    seen: dict[str, None] = {}
    for ranks in maps:
        seen.update(dict.fromkeys(ranks))
    names = depth_order(list(seen))
    if not names:
        raise ValueError("plot_rank_history: no adapted modules to draw.")
    # A module missing from a record (not expected from FlexLoRACallback) is drawn as a blank cell, not as rank 0.
    grid = np.full((len(names), len(maps)), np.nan)
    for j, ranks in enumerate(maps):
        for i, name in enumerate(names):
            if name in ranks:
                grid[i, j] = ranks[name]

    n_rows, n_cols = grid.shape
    label_width = 0.065 * max(len(n) for n in names)  # inches of y tick labels at 8 pt
    width = min(18.0, max(6.0, 2.5 + label_width + 0.4 * n_cols))
    height = min(24.0, max(3.0, 1.6 + 0.2 * n_rows))
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    finite = grid[np.isfinite(grid)]
    lo, hi = (int(finite.min()), int(finite.max())) if finite.size else (0, 1)
    # Ranks are integers: one colour per rank value (BoundaryNorm), integer colorbar ticks.
    bounds = np.arange(lo - 0.5, hi + 1.5, 1.0)
    cmap = matplotlib.colormaps["viridis"].resampled(max(len(bounds) - 1, 2))
    norm = BoundaryNorm(bounds, cmap.N)
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    colorbar = fig.colorbar(image, ax=ax, ticks=MaxNLocator(integer=True, nbins=min(hi - lo + 1, 12)))
    colorbar.set_label("rank")
    if n_rows * n_cols <= 600:  # small grids: write the rank in every cell
        for i in range(n_rows):
            for j in range(n_cols):
                if np.isfinite(grid[i, j]):
                    shade = norm(grid[i, j]) / max(cmap.N - 1, 1)
                    ax.text(
                        j,
                        i,
                        str(int(grid[i, j])),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="black" if shade > 0.5 else "white",
                    )

    # Thin tick labels so that large models stay readable (at most ~60 row and ~30 column labels).
    row_step = max(1, math.ceil(n_rows / 60))
    rows = list(range(0, n_rows, row_step))
    ax.set_yticks(rows)
    ax.set_yticklabels([names[i] for i in rows], fontsize=6 if n_rows > 24 else 8)
    col_step = max(1, math.ceil(n_cols / 30))
    cols = list(range(0, n_cols, col_step))
    ax.set_xticks(cols)
    ax.set_xticklabels([labels[j] for j in cols], rotation=90 if n_cols > 8 else 0, fontsize=8)
    ax.set_xlabel("optimizer step of the reallocation event" if labels != ["current"] else "")
    ax.set_ylabel("adapted matrix (by layer depth)")
    total = int(np.nansum(grid[:, -1]))
    ax.set_title(title if title is not None else f"FlexLoRA rank allocation (total rank {total})", fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(os.fspath(path), format="png", bbox_inches="tight")
        logger.debug("Wrote rank heatmap to %s", path)
    return fig
