"""SAM 3 worker-side tests: the model code in the worker-sam3 environment (transformers >= 5, no Dagster)."""

import sys
from pathlib import Path

# Shared test helpers (synthetic images) live one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
