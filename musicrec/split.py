"""Split the listening log into three periods by date.

P1 (train, before ``label_start``) feeds the candidate models, P2 (label, ``label_start`` up to
``test_start``) gives the ranker its labels, P3 (test, ``test_start`` .. ``last_day``) is only
used for metrics. The dates come from the settings or follow from the data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from musicrec.columns import Columns as C
from musicrec.errors import DataError
from musicrec.io import date_to_day, day_to_date
from musicrec.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitDates:
    """Day numbers (days since 1970-01-01) of the period boundaries."""

    first_day: int
    label_start: int
    test_start: int
    last_day: int

    def as_dict(self) -> dict[str, str]:
        """ISO dates, for the manifest and the work folder."""
        return {
            "first_day": str(day_to_date(self.first_day)),
            "label_start": str(day_to_date(self.label_start)),
            "test_start": str(day_to_date(self.test_start)),
            "last_day": str(day_to_date(self.last_day)),
        }

    @classmethod
    def from_dict(cls, values: dict[str, str]) -> SplitDates:
        return cls(
            **{
                key: date_to_day(values[key])
                for key in ("first_day", "label_start", "test_start", "last_day")
            }
        )


def split_dates(events: pd.DataFrame, settings: Settings) -> SplitDates:
    """Period boundaries from ``settings.test_start``/``label_start`` or from the data.

    Without settings the test period starts at the day that leaves about
    ``settings.test_share`` of the events on or after it, and the label period is an equal span
    of days right before it — longer when that span holds no event date (month-granular logs).
    """
    if len(events) == 0:
        raise DataError("events table is empty: nothing to split")
    days = events[C.day].to_numpy()
    first = int(days.min())
    per_day = np.bincount(days.astype(np.int64) - first)
    seen = np.flatnonzero(per_day)
    return split_from_day_counts(seen + first, per_day[seen], settings)


def split_from_day_counts(days: np.ndarray, counts: np.ndarray, settings: Settings) -> SplitDates:
    """:func:`split_dates` from the distinct event days (sorted) and the events on each: all
    the split needs, so an engine that cannot hold the events (Spark) passes only these."""
    if days.size == 0:
        raise DataError("events table is empty: nothing to split")
    days = np.asarray(days, dtype=np.int64)
    first_day, last_day = int(days[0]), int(days[-1])
    if settings.test_start is not None:
        test_start = date_to_day(settings.test_start)
    else:  # the latest day that leaves at least test_share of the events on or after it
        on_or_after = np.cumsum(np.asarray(counts)[::-1])[::-1]
        test_start = int(
            days[np.flatnonzero(on_or_after >= settings.test_share * on_or_after[0])[-1]]
        )
    if settings.label_start is not None:
        label_start = date_to_day(settings.label_start)
    else:
        label_start = test_start - (last_day - test_start + 1)
        # coarse dates (e.g. one per month): the span must reach back to an earlier date
        earlier = days[days < test_start]
        if earlier.size:
            label_start = min(label_start, int(earlier.max()))
    dates = SplitDates(first_day, label_start, test_start, last_day)
    if not first_day < label_start < test_start <= last_day:
        raise DataError(
            f"split dates do not fit the data ({dates.as_dict()}): need first day < label start "
            "< test start <= last day; set MUSICREC_TEST_START / MUSICREC_LABEL_START"
        )
    log.info(
        "split: train %s..%s, label %s..%s, test %s..%s",
        day_to_date(first_day),
        day_to_date(label_start - 1),
        day_to_date(label_start),
        day_to_date(test_start - 1),
        day_to_date(test_start),
        day_to_date(last_day),
    )
    return dates


def split_events(
    events: pd.DataFrame, dates: SplitDates
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(train, label, test) events; the row order of ``events`` is kept inside each."""
    days = events[C.day].to_numpy()
    train = events[days < dates.label_start].reset_index(drop=True)
    label = events[(days >= dates.label_start) & (days < dates.test_start)].reset_index(drop=True)
    test = events[days >= dates.test_start].reset_index(drop=True)
    return train, label, test


def events_before(events: pd.DataFrame, day: int) -> pd.DataFrame:
    """Events strictly before ``day`` (one boolean mask, no copy of the other periods)."""
    return events[events[C.day].to_numpy() < day].reset_index(drop=True)
