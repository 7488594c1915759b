"""Test-wide setup; these must precede any import of torch or triton."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors in the interpreter
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import zoo`, `import reference`

import torch  # noqa: E402

# two pytest-xdist workers share CI's two cores: one thread each (the models are tiny)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))
