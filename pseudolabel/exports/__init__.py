"""Dataset exports: one versioned, atomically published copy of the pseudo-labels as COCO instance
segmentation, Ultralytics YOLO-seg and Label Studio tasks (:func:`export_dataset`)."""

from pseudolabel.exports.publish import (
    FORMATS,
    ExportBatch,
    ExportSummary,
    check_formats,
    export_dataset,
    read_current_export,
)

__all__ = [
    "FORMATS",
    "ExportBatch",
    "ExportSummary",
    "check_formats",
    "export_dataset",
    "read_current_export",
]
