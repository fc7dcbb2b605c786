"""Writing a benchmark's results: ``<stem>.json``, ``<stem>.md`` and (optionally) ``<stem>.png``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable


def save_results(res: dict[str, Any], markdown: str, out: Path, stem: str,
                 plot: Callable[[dict[str, Any], Path], None] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (out / f"{stem}.md").write_text(markdown)
    if plot is not None:
        plot(res, out / f"{stem}.png")
