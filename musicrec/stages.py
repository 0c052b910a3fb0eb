"""The pipeline's stage names and their one-line help, in run order.

Kept apart from ``musicrec.pipeline`` (which re-exports them) so that the command line can
list the stages without importing the models: ``musicrec --help`` works on an install without
the ``pipeline`` extra.
"""

from __future__ import annotations

STAGES = ("split", "search", "rank", "evaluate", "serve")
STAGE_HELP = {
    "split": "train / validation (label) / test periods by date",
    "search": "each source's configuration by NDCG@10 on the validation period",
    "rank": "train the ranker; pick the served model on held-out validation users",
    "evaluate": "refit before the test period; metrics with intervals on it",
    "serve": "refit on the whole log; write the lists the service serves",
}
