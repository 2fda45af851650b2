"""Run a bin/ script with the checkout's virtualenv when started by another Python.

`bin/phantom-top` started as `./bin/phantom-top` runs whatever `python3` is
first on PATH; if that interpreter lacks the project's dependencies and
`.venv/` (made by `make venv` or `make up`) exists, the script is re-run
with `.venv/bin/python`. Imports nothing outside the standard library.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"


def ensure(script: str, modules: tuple[str, ...] = ("zmq", "msgpack", "loguru")) -> None:
    """Re-exec ``script`` under ``.venv/bin/python`` unless ``modules`` import here; puts
    the checkout on ``sys.path``. Exits 2 with a hint when there is no virtualenv."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if all(importlib.util.find_spec(m) is not None for m in modules):
        return
    python = VENV / "bin" / "python"
    if python.exists() and Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(str(python), [str(python), script, *sys.argv[1:]])
    missing = ", ".join(m for m in modules if importlib.util.find_spec(m) is None)
    sys.exit(f"{Path(script).name}: missing Python packages ({missing}); run `make venv` in {ROOT} first")
