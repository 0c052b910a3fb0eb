"""Synthetic artefacts at the full scale of the real data, for the service benchmarks.

1,373,221 users x 100 offline recommendations (137 M rows), 1,000,000 tracks x 50 similar
tracks (50 M rows), 10,000 top popular tracks, items with names; written with
``musicrec.io.write_table`` (zstd, page checksums) and a manifest with each file's rows and
bytes, then the served (memory-mapped) form with its checksums through
``musicrec.served.publish``, as the pipeline writes them. Ids are random but follow every
artefact contract (sorted, ranks from 1, no track similar to itself, every track in
items.parquet). With them, the ALS files of the service's fold-in (``musicrec.online``): 64
factors for every track and user, and ~120 heard tracks per user (165 M rows, about the real
log's distinct pairs); ``--no-factors`` leaves them out.

    python bench/make_full_artefacts.py /tmp/fullart        # ~2 min, ~5 GB peak
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from musicrec import io, served  # noqa: E402
from musicrec.online import cluster_rows  # noqa: E402

log = logging.getLogger("make_full_artefacts")

N_TRACKS = 1_000_000
N_USERS = 1_373_221
N_RECS = 100
N_SIMILAR = 50
N_POPULAR = 10_000
N_FACTORS = 64
MEAN_HEARD = 120  # distinct tracks per user
MAX_TRACK_ID = 101_521_819  # the real data's id range
MAX_USER_ID = 1_374_582


def _lists(values: pa.Array) -> pa.ListArray:
    """One-element lists of ``values``."""
    offsets = pa.array(np.arange(len(values) + 1, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values)


def write_factors(
    out: Path, track_ids: np.ndarray, users: np.ndarray, rng: np.random.Generator
) -> None:
    """The ALS served files: random factors (the shape and cost of a real model, not its
    values) grouped into IVF clusters as the pipeline writes them, heard rows per user."""
    import faiss

    faiss.omp_set_num_threads(2)
    item_factors = rng.standard_normal((N_TRACKS, N_FACTORS), dtype=np.float32) * 0.1
    order, lists, centroids, norms2 = cluster_rows(item_factors, rng.permutation(N_TRACKS))
    item_factors = np.ascontiguousarray(item_factors[order])
    ids = track_ids[order]
    heard_counts = np.minimum(rng.geometric(1 / MEAN_HEARD, users.size), 5000)
    offsets = np.zeros(users.size + 1, dtype=np.int64)
    np.cumsum(heard_counts, out=offsets[1:])
    sorted_rows = np.argsort(ids, kind="stable").astype(np.int32)
    y = item_factors.astype(np.float64)
    served.write_factors(
        {
            "item_factors": item_factors,
            "track_ids": ids,
            "sorted_tracks": ids[sorted_rows],
            "sorted_rows": sorted_rows,
            "gram": y.T @ y,
            "params": np.array([0.1, 4.0]),
            "user_ids": users,
            "user_factors": rng.standard_normal((users.size, N_FACTORS), dtype=np.float32) * 0.1,
            "heard_offsets": offsets,
            "heard_rows": rng.integers(0, N_TRACKS, int(offsets[-1]), dtype=np.int32),
            "list_offsets": lists,
            "centroids": centroids,
            "centroid_norms2": norms2,
        },
        out,
    )


def make(out: Path, seed: int = 0, factors: bool = True) -> dict:
    """Write the four service artefacts and a manifest into ``out``; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    track_ids = np.sort(rng.choice(MAX_TRACK_ID, N_TRACKS, replace=False)).astype(np.int32) + 26
    artist = rng.integers(0, 150_000, N_TRACKS)
    items = pa.table(
        {
            "track_id": pa.array(track_ids),
            "name": pa.array([f"track {t}" for t in track_ids]),
            "album_ids": _lists(pa.array(artist * 3)),
            "artist_ids": _lists(pa.array(artist)),
            "genre_ids": _lists(pa.array(artist % 166)),
            "albums": _lists(pa.array([f"album {a * 3}" for a in artist])),
            "artists": _lists(pa.array([f"artist {a}" for a in artist])),
            "genres": _lists(pa.array([f"genre {a % 166}" for a in artist])),
        }
    )
    io.write_table(items, out / io.ITEMS)
    del items
    log.info("items: %.1f s", time.perf_counter() - started)

    popular = track_ids[rng.permutation(N_TRACKS)[:N_POPULAR]]
    io.write_table(
        pa.table(
            {
                "track_id": pa.array(popular),
                "listeners": pa.array(np.arange(N_POPULAR, 0, -1, dtype=np.int64)),
                "score": pa.array(np.linspace(1, 0, N_POPULAR, dtype=np.float32)),
                "rank": pa.array(np.arange(1, N_POPULAR + 1, dtype=np.int32)),
            }
        ),
        out / io.TOP_POPULAR,
        io.POPULAR_SCHEMA,
    )

    own = np.repeat(np.arange(N_TRACKS), N_SIMILAR)
    other = rng.integers(0, N_TRACKS - 1, N_TRACKS * N_SIMILAR)
    other = np.where(other >= own, other + 1, other)  # never the track itself
    rank = np.tile(np.arange(1, N_SIMILAR + 1, dtype=np.int16), N_TRACKS)
    io.write_table(
        pa.table(
            {
                "track_id": track_ids[own],
                "similar_track_id": track_ids[other],
                "score": (1.0 / rank).astype(np.float32),
                "rank": rank,
            }
        ),
        out / io.SIMILAR,
        io.SIMILAR_SCHEMA,
    )
    del own, other, rank
    log.info("similar: %.1f s", time.perf_counter() - started)

    users = np.sort(rng.choice(MAX_USER_ID, N_USERS, replace=False)).astype(np.int32)
    rank = np.tile(np.arange(1, N_RECS + 1, dtype=np.int16), N_USERS)
    io.write_table(
        pa.table(
            {
                "user_id": np.repeat(users, N_RECS),
                "track_id": track_ids[rng.integers(0, N_TRACKS, N_USERS * N_RECS)],
                "score": (1.0 / rank).astype(np.float32),
                "rank": rank,
            }
        ),
        out / io.RECOMMENDATIONS,
        io.RECS_SCHEMA,
    )
    log.info("recommendations: %.1f s", time.perf_counter() - started)

    manifest = {
        "run_id": f"synthetic-full-{seed}",
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "prepared_files": {io.ITEMS: (out / io.ITEMS).stat().st_size},
        "artefacts": {
            name: {
                "rows": pq.read_metadata(out / name).num_rows,
                "bytes": (out / name).stat().st_size,
            }
            for name in (io.TOP_POPULAR, io.SIMILAR, io.RECOMMENDATIONS)
        },
    }
    io.write_json(manifest, out / io.MANIFEST)
    log.info("parquet and manifest: %.1f s", time.perf_counter() - started)
    if factors:
        write_factors(out, track_ids, users, rng)
        log.info("ALS factors: %.1f s", time.perf_counter() - started)
    manifest = served.publish(out)  # the served form, as the pipeline's run_all writes it
    log.info("served form: %.1f s", time.perf_counter() - started)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the artefacts into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-factors", action="store_true", help="no ALS fold-in files")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(make(args.out, args.seed, factors=not args.no_factors))


if __name__ == "__main__":
    main()
