"""How every benchmark script hands back its figures: JSON on stdout, and in a file when asked."""

from __future__ import annotations

import json
from pathlib import Path


def emit(results: dict, out: Path | None) -> None:
    text = json.dumps(results, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text)
