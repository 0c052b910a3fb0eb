"""Similar tracks: nearest neighbours of each track's ALS factors by cosine similarity."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from musicrec.als import AlsModel
from musicrec.arrays import distinct, rank_in_groups
from musicrec.columns import Columns as C
from musicrec.topk import IvfIndex

log = logging.getLogger(__name__)


def similar_codes(
    model: AlsModel,
    codes: np.ndarray,
    n: int,
    batch_size: int = 4096,
    progress: bool = True,
    index: IvfIndex | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``n`` most similar track codes of each code in ``codes`` (never itself):
    (query code, similar code, cosine) arrays ordered by query then similarity.

    Exact (implicit's batched ``similar_items``) without ``index``; with a cosine
    ``IvfIndex`` over the item factors, approximate (only the probed clusters are scored).
    """
    codes = np.asarray(codes, dtype=np.int32)
    n = min(n, len(model.track_ids) - 1)
    if n <= 0 or codes.size == 0:
        empty = np.zeros(0, np.int32)
        return empty, empty, np.zeros(0, np.float32)
    out_query, out_similar, out_scores = [], [], []
    if index is not None:
        batch_size = max(batch_size, 32768)
    with threadpool_limits(limits=1, user_api="blas"):
        for start in tqdm(
            range(0, codes.size, batch_size),
            desc="similar tracks",
            unit="batch",
            disable=not progress,
            mininterval=2,
        ):
            batch = codes[start : start + batch_size]
            if index is None:
                ids, scores = model.model.similar_items(batch, N=n + 1)
            else:
                ids, scores = index.search(model.model.item_factors[batch], n + 1)
            found = ids >= 0
            not_self = found & (ids != batch[:, None])
            # A track is normally its own best match; when a tie pushed it out, drop the last.
            not_self &= np.cumsum(not_self, axis=1) <= n
            rows, _ = np.nonzero(not_self)
            out_query.append(batch[rows])
            out_similar.append(ids[not_self].astype(np.int32))
            out_scores.append(scores[not_self].astype(np.float32))
    return np.concatenate(out_query), np.concatenate(out_similar), np.concatenate(out_scores)


def similar_tracks(
    model: AlsModel,
    n: int,
    track_ids: np.ndarray | None = None,
    batch_size: int = 4096,
    index: IvfIndex | None = None,
) -> pd.DataFrame:
    """Similar-tracks table (similar schema, input ids) for ``track_ids`` (default: every track
    with factors); tracks unknown to the model are skipped. ``index``: a cosine ``IvfIndex``
    over the model's item factors for approximate search (``als.item_index``)."""
    if track_ids is None:
        codes = np.arange(len(model.track_ids), dtype=np.int32)
    else:
        codes = model.tracks.codes(distinct(track_ids))
        codes = codes[codes >= 0]
    query, similar, scores = similar_codes(model, codes, n, batch_size, index=index)
    # each query's matches come out together, best first: ranks count within the query
    return pd.DataFrame(
        {
            C.track: model.track_ids[query],
            C.similar: model.track_ids[similar],
            C.score: scores,
            C.rank: (rank_in_groups(query) + 1).astype(np.int16),
        }
    )
