"""Split dates from the data or the settings, and periods without overlap."""

from datetime import date

import numpy as np
import pandas as pd
import pytest

from musicrec import io
from musicrec.errors import DataError
from musicrec.io import date_to_day
from musicrec.settings import Settings
from musicrec.split import SplitDates, events_before, split_dates, split_events

START = date_to_day("2031-03-01")  # nothing may depend on 2022


def ten_days(per_day: int = 10) -> pd.DataFrame:
    """``per_day`` events on each of ten days, user = event number, track = day."""
    days = np.repeat(np.arange(10), per_day) + START
    return pd.DataFrame(
        {
            "user_id": np.arange(days.size, dtype=np.int32),
            "track_id": (days - START).astype(np.int32),
            "day": days.astype(np.int16),
        }
    )


def test_dates_follow_from_the_data() -> None:
    # 100 events, 10 a day: the last 2 days hold exactly 20 %, the last 3 days 30 %.
    dates = split_dates(ten_days(), Settings(test_share=0.2))
    assert dates == SplitDates(START, START + 6, START + 8, START + 9)
    # 25 % needs the last three days; the label span is then three days too.
    dates = split_dates(ten_days(), Settings(test_share=0.25))
    assert (dates.label_start, dates.test_start) == (START + 4, START + 7)


def test_dates_from_settings_win() -> None:
    settings = Settings(test_start=date(2031, 3, 9), label_start=date(2031, 3, 3))
    dates = split_dates(ten_days(), settings)
    assert (dates.label_start, dates.test_start) == (START + 2, START + 8)
    assert dates.as_dict()["test_start"] == "2031-03-09"
    assert SplitDates.from_dict(dates.as_dict()) == dates


def test_impossible_dates_are_refused() -> None:
    with pytest.raises(DataError, match="split dates"):
        split_dates(ten_days(), Settings(test_start=date(2031, 3, 1)))
    with pytest.raises(DataError, match="empty"):
        split_dates(ten_days().iloc[:0], Settings())


def test_periods_do_not_overlap_and_cover_everything() -> None:
    events = ten_days()
    dates = split_dates(events, Settings(test_share=0.2))
    train, label, test = split_events(events, dates)
    assert len(train) + len(label) + len(test) == len(events)
    assert train["day"].max() < dates.label_start <= label["day"].min()
    assert label["day"].max() < dates.test_start <= test["day"].min()
    assert len(label) == 20 and len(test) == 20
    ids = [set(frame["user_id"]) for frame in (train, label, test)]  # user = event number
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])
    before = events_before(events, dates.test_start)
    assert len(before) == 80 and before["day"].max() == START + 7


def test_month_granular_dates_get_a_label_period_with_events() -> None:
    """One date per month and the last month alone holding the test share: an equal span of
    days before it (one day) would hold no event; the label period reaches the previous date."""
    months = np.array([date(2021, m, 1) for m in range(1, 13)], dtype="datetime64[D]")
    days = np.repeat(months.astype(np.int64), [10] * 11 + [30]).astype(np.int16)
    events = pd.DataFrame(
        {
            "user_id": np.arange(days.size, dtype=np.int32),
            "track_id": np.zeros(days.size, np.int32),
            "day": days,
        }
    )
    dates = split_dates(events, Settings(test_share=0.2))
    assert io.day_to_date(dates.test_start) == np.datetime64("2021-12-01")
    assert io.day_to_date(dates.label_start) == np.datetime64("2021-11-01")
    in_label = (days >= dates.label_start) & (days < dates.test_start)
    assert in_label.sum() == 10
