"""Counters for one shard run, and their Markdown rendering for asset metadata."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pseudolabel.images.index import OK, IndexRow

EXAMPLES_PER_REASON = 3


@dataclass
class ShardStats:
    shard: str
    total: int = 0  # items in the shard's sample
    reused: int = 0  # kept from a previous run, not downloaded
    fetched: int = 0  # attempted in this run (downloaded, or failed trying)
    ok: int = 0  # usable images in the index (reused + new)
    quarantined: int = 0
    bytes_downloaded: int = 0
    bytes_stored: int = 0  # JPEG bytes written in this run
    elapsed_s: float = 0.0
    reasons: Counter[str] = field(default_factory=Counter)
    # reason -> a few (image_id, url, error) examples
    examples: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    orientations: Counter[int] = field(default_factory=Counter)  # over every "ok" row of the shard

    def record(self, row: IndexRow, *, reused: bool) -> None:
        self.total += 1
        if reused:
            self.reused += 1
        else:
            self.fetched += 1
        if row["status"] == OK:
            self.ok += 1
            self.orientations[int(row["original_orientation"])] += 1
            return
        self.quarantined += 1
        reason = str(row["error"]).split(":", 1)[0]
        self.reasons[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append((row["image_id"], row["url"], row["error"]))

    @property
    def done(self) -> int:
        return self.ok + self.quarantined

    @property
    def failure_rate(self) -> float:
        return self.quarantined / self.total if self.total else 0.0

    @property
    def images_per_s(self) -> float:
        """Throughput of this run's downloads (reused images cost nothing, so they don't count)."""
        return self.fetched / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def progress_line(self, planned: int) -> str:
        return (
            f"{self.shard}: {self.done}/{planned} images ({self.ok} ok, {self.quarantined} quarantined, "
            f"{self.reused} reused), {self.bytes_downloaded / 1e6:.1f} MB downloaded"
        )

    def reasons_markdown(self) -> str:
        """Counts per reason category with a few examples, as a Markdown table."""
        if not self.reasons:
            return "No quarantined images."
        lines = ["| reason | count | example image_id | example error |", "|---|---:|---|---|"]
        for reason, count in self.reasons.most_common():
            for n, (image_id, _url, error) in enumerate(self.examples.get(reason, [])):
                shown = (reason, str(count)) if n == 0 else ("", "")
                lines.append(f"| {shown[0]} | {shown[1]} | `{image_id}` | {_cell(error)} |")
        return "\n".join(lines)


def _cell(text: str, limit: int = 160) -> str:
    """Keep a table cell on one line and short, with pipes escaped."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"
