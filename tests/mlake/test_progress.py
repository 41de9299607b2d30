"""Progress as log lines where there is no terminal (mlake.progress)."""

from __future__ import annotations

import re

from mlake.progress import Bars, LogBar, progress_bar


def test_log_bar_says_count_rate_and_status_every_tenth_and_at_the_end() -> None:
    lines: list[str] = []
    bar = LogBar("rome", 20, "edit", lines.append)
    for k in range(20):
        bar.set_postfix_str(f"en loss {k / 10:.3f}", refresh=False)
        bar.update(1)
    bar.close()  # finished: nothing more to say
    assert len(lines) == 10  # at 2, 4, ..., 20 of 20
    assert re.fullmatch(r"rome: 2/20 edits, [\d.]+ edit/s \(en loss 0\.100\)", lines[0])
    assert lines[-1].startswith("rome: 20/20 edits,") and lines[-1].endswith("(en loss 1.900)")


def test_log_bar_reports_an_unfinished_count_when_closed() -> None:
    lines: list[str] = []
    bar = LogBar("trace", 100, "fact", lines.append)
    bar.update(3)  # below 10%: silent
    assert lines == []
    bar.close()
    assert len(lines) == 1 and lines[0].startswith("trace: 3/100 facts,")
    # Without a total: only the closing line, with the count.
    lines.clear()
    bar = LogBar("probe", None, "prompt", lines.append)
    bar.update(5)
    bar.close()
    assert len(lines) == 1 and lines[0].startswith("probe: 5 prompts,")


def test_bars_are_log_lines_without_a_terminal() -> None:
    lines: list[str] = []
    assert isinstance(Bars(False, lines.append)("x", 3, "fact"), LogBar)
    assert not isinstance(Bars(True, lines.append)("x", 3, "fact"), LogBar)
    # Under pytest stderr is captured, not a terminal.
    assert isinstance(progress_bar("x", 3, "fact", lines.append), LogBar)
