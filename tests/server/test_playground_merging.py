"""/playground on a server merging forwards (``--max-batch``): each card says how its request's forwards
merged. Its own module: one headless browser at a time per thread, and the page tests keep theirs open
for their whole module."""

from __future__ import annotations

import re
from pathlib import Path

from .conftest import live_server
from .test_docs_offline import browser
from .test_playground import _card, _term


def test_a_server_merging_forwards_shows_how_each_column_merged(model_cache: Path) -> None:
    """With --max-batch, the columns run at once and their forwards merge; each card says how."""
    for merging in live_server(model_cache, models=["tiny-flux"], max_batch=4):
        with browser(merging.base_url) as opened:
            page = opened.new_page()
            page.goto(opened.base_url + "/playground")
            page.locator("body[data-ready=true]").wait_for(state="attached")
            page.locator("#run").click()
            page.locator('.card[data-status="succeeded"]').nth(2).wait_for(state="attached", timeout=60_000)
            for title in ("uncached", "preset fast"):
                shown = _term(_card(page, title), "merged forwards")
                match = re.fullmatch(
                    r"(\d+) of (\d+), ([\d.]+) requests each on average, at most (\d+)", shown
                )
                assert match is not None, shown
                merged, runs, mean, largest = int(match[1]), int(match[2]), float(match[3]), int(match[4])
                assert 0 <= merged <= runs and runs > 0 and 1 <= mean <= largest <= 4
            page.close()
