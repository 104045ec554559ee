"""The label thresholds as a resource: the YAML file is read when a step runs, never at import time.

``path`` empty (the default) means ``$PSEUDOLABEL_THRESHOLDS`` when set, else the packaged
``pseudolabel/labels/thresholds.yaml``, resolved at run time. The definitions stamp the same file's
fingerprint on ``pseudo_labels`` as its code version (see ``dagster_project/definitions.py``), which is
what shows a threshold edit as "unsynced" in the UI once the code location reloads.
"""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource

from pseudolabel.labels.thresholds import Thresholds, load_thresholds, thresholds_path


class ThresholdsResource(ConfigurableResource):
    path: str = ""  # "" = $PSEUDOLABEL_THRESHOLDS, else the packaged default

    def file(self) -> Path:
        return Path(self.path).expanduser() if self.path.strip() else thresholds_path()

    def load(self) -> Thresholds:
        return load_thresholds(self.file())
