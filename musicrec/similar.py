"""Similar tracks: nearest neighbours of each track's ALS factors by cosine similarity."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from musicrec.als import AlsModel
from musicrec.columns import Columns as C

log = logging.getLogger(__name__)


def similar_codes(
    model: AlsModel, codes: np.ndarray, n: int, batch_size: int = 4096, progress: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``n`` most similar track codes of each code in ``codes`` (never itself):
    (query code, similar code, cosine) arrays ordered by query then similarity.

    Brute force with implicit's batched ``similar_items``; a later ANN index goes here.
    """
    codes = np.asarray(codes, dtype=np.int32)
    n = min(n, len(model.track_ids) - 1)
    if n <= 0 or codes.size == 0:
        empty = np.zeros(0, np.int32)
        return empty, empty, np.zeros(0, np.float32)
    out_query, out_similar, out_scores = [], [], []
    with threadpool_limits(limits=1, user_api="blas"):
        for start in tqdm(range(0, codes.size, batch_size), desc="similar tracks", unit="batch",
                          disable=not progress, mininterval=2):
            batch = codes[start:start + batch_size]
            ids, scores = model.model.similar_items(batch, N=n + 1)
            not_self = ids != batch[:, None]
            # A track is normally its own best match; when a tie pushed it out, drop the last.
            no_self_found = not_self.all(axis=1)
            not_self[no_self_found, -1] = False
            out_query.append(np.repeat(batch, n))
            out_similar.append(ids[not_self].astype(np.int32))
            out_scores.append(scores[not_self].astype(np.float32))
    return np.concatenate(out_query), np.concatenate(out_similar), np.concatenate(out_scores)


def similar_tracks(
    model: AlsModel, n: int, track_ids: np.ndarray | None = None, batch_size: int = 4096
) -> pd.DataFrame:
    """Similar-tracks table (similar schema, input ids) for ``track_ids`` (default: every track
    with factors); tracks unknown to the model are skipped."""
    if track_ids is None:
        codes = np.arange(len(model.track_ids), dtype=np.int32)
    else:
        codes = model.tracks.codes(np.unique(np.asarray(track_ids)))
        codes = codes[codes >= 0]
    query, similar, scores = similar_codes(model, codes, n, batch_size)
    # implicit returns each row best first, so the table is sorted by track then rank
    per_track = min(n, len(model.track_ids) - 1)
    ranks = np.tile(np.arange(1, per_track + 1, dtype=np.int16), codes.size)
    return pd.DataFrame(
        {
            C.track: model.track_ids[query],
            C.similar: model.track_ids[similar],
            C.score: scores,
            C.rank: ranks,
        }
    )
