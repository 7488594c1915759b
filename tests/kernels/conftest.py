"""Until the lead's tests/conftest.py exists: run Triton through its CPU interpreter, keep Inductor's cache in the repo."""

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parents[2] / ".cache" / "inductor"))
