"""Run the README quickstart (works offline: falls back to a random-weight model when the Hub is unreachable)."""

import os
import re
from pathlib import Path

readme = Path(__file__).resolve().parents[1] / "README.md"
block = re.search(r"## Quickstart\n\n```python\n(.*?)```", readme.read_text(encoding="utf-8"), re.S).group(1)
os.chdir(os.environ.get("VLSEG_QUICKSTART_DIR", os.getcwd()))
exec(compile(block, str(readme) + ":quickstart", "exec"))
