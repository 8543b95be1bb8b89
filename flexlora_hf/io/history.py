"""The one writer of `rank_history.json` and `rank_heatmap.png` (paper Figure 2), for the Trainer and the saver.

The JSON is the record and is always written; the picture needs matplotlib (`pip install "flexlora_hf[plot]"`) and
is skipped with a warning when it is missing.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from ..constants import HEATMAP_NAME, RANK_HISTORY_NAME
from .atomic import atomic_write, write_json

if TYPE_CHECKING:
    from ..adapter.model import FlexLoRAModel

logger = logging.getLogger(__name__)
_warned_no_plot = False


def write_rank_history(model: FlexLoRAModel, output_dir: str) -> None:
    """Write `model.rank_history` as `rank_history.json` and draw `rank_heatmap.png` into `output_dir`.

    Args:
        model (`FlexLoRAModel`): its `rank_history` (every event so far) and current rank map are written.
        output_dir (`str`): created if needed; files are replaced atomically.
    """
    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, RANK_HISTORY_NAME), list(model.rank_history))
    if model.rank_history and "motion" in model.rank_history[-1]:
        motion = model.rank_history[-1]["motion"]
        logger.info(
            "FlexLoRA moved %d of %d rank units (%.1f%%) over %d events; %.0f%% of expansions were pruned at the next.",
            motion["moved"], model.total_rank(), 100 * motion["moved_share"], len(model.rank_history),
            100 * motion["churn"],
        )
    try:
        from .plotting import plot_rank_history

        def draw(tmp: str) -> None:
            plot_rank_history(model, tmp)

        atomic_write(os.path.join(output_dir, HEATMAP_NAME), draw)
        logger.info("Wrote %s and %s to %s", RANK_HISTORY_NAME, HEATMAP_NAME, output_dir)
    except ImportError as err:  # matplotlib missing: the JSON is the record, the picture is a convenience
        global _warned_no_plot
        if _warned_no_plot:
            return
        _warned_no_plot = True
        logger.warning(
            "Could not draw the rank heatmap (%s); install it with `pip install \"flexlora_hf[plot]\"`.", err
        )
