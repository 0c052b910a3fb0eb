"""musicrec.progress: the stage counter logs each step and draws a bar on stderr, and the
``progress`` setting silences both (the counter's lines drop to DEBUG)."""

from __future__ import annotations

import logging

import pytest

from musicrec.progress import Steps


def test_steps_count_log_and_draw(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, logger="musicrec.progress")
    with Steps("prepare", 3, enabled=True) as steps:
        for text in ("read tracks", "read interactions", "write events"):
            steps.step(text)
    assert [r.getMessage() for r in caplog.records] == [
        "prepare 1/3: read tracks",
        "prepare 2/3: read interactions",
        "prepare 3/3: write events",
    ]
    assert steps.bar.n == 3  # the last step counted as done on close
    err = capsys.readouterr().err
    assert "prepare: 2/3 steps" in err and "read interactions" in err


def test_silenced_steps_draw_nothing_and_log_at_debug(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG, logger="musicrec.progress")
    with Steps("evaluate", 2, enabled=False) as steps:
        steps.step("lists")
        steps.step("metrics")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, "evaluate 1/2: lists"),
        (logging.DEBUG, "evaluate 2/2: metrics"),
    ]
    assert capsys.readouterr().err == ""
