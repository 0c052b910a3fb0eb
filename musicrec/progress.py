"""Progress of the long steps: a stage counter (a log line per step) and a bar on stderr.

Both follow the ``progress`` setting: off, the counter's lines drop to DEBUG and no bar is
drawn — what the notebook wants, since a saved notebook would keep stale bars. Pass the setting
in (``Steps("evaluate", 6, settings.progress)``); nothing here reads a global.
"""

from __future__ import annotations

import logging
from types import TracebackType

from tqdm.auto import tqdm

log = logging.getLogger("musicrec.progress")


class Steps:
    """Counts the steps of one stage: ``step(text)`` logs ``<name> 2/6: text`` and advances a
    bar whose label names the step under way. Use as a context manager to close the bar."""

    def __init__(self, name: str, total: int, enabled: bool = True) -> None:
        self.name, self.total, self.enabled, self.done = name, total, enabled, 0
        self.bar = tqdm(
            total=total,
            desc=name,
            unit="step",
            disable=not enabled,
            leave=False,
            bar_format="{desc}: {n_fmt}/{total_fmt} steps |{bar:20}| {elapsed} {postfix}",
        )

    def step(self, text: str) -> None:
        """Start the next step (the previous one is complete)."""
        if self.done:
            self.bar.update(1)
        self.done += 1
        log.log(
            logging.INFO if self.enabled else logging.DEBUG,
            "%s %d/%d: %s",
            self.name,
            self.done,
            self.total,
            text,
        )
        self.bar.set_postfix_str(text, refresh=True)

    def close(self) -> None:
        """Mark the last step complete and remove the bar."""
        if self.done:
            self.bar.update(1)
        self.bar.close()

    def __enter__(self) -> Steps:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()
