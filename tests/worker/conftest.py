"""Worker-side tests: the model code in the model-worker environment (no Dagster there)."""

import sys
from pathlib import Path

# Shared test helpers (synthetic images) live one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
