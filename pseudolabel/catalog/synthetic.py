"""A deterministic synthetic catalog of any size, generated page by page (for benchmarks and demos).

Items look like the real API's: ``{"id", "image_url", "label"}``. Labels follow a skewed (Zipf-like)
distribution over ``num_labels`` tree species, and every ``duplicate_every``-th item repeats an
earlier item's URL so deduplication has work to do. Nothing is stored: item ``i`` is a pure function of ``i``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_LABEL_SLOTS = 4096  # label lookup table resolution
_MIX = 2654435761  # Knuth's multiplicative hash: spreads consecutive ids over the label table


@dataclass(frozen=True)
class SyntheticCatalog:
    total: int
    num_labels: int = 50
    duplicate_every: int = 50  # 0 disables duplicates
    url_prefix: str = "https://images.example.com/trees/"
    _slots: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        weights = [1.0 / rank for rank in range(1, self.num_labels + 1)]
        scale = _LABEL_SLOTS / sum(weights)
        slots: list[str] = []
        for index, weight in enumerate(weights):
            slots += [self.label_name(index)] * max(1, round(weight * scale))
        object.__setattr__(self, "_slots", tuple(slots))
        if self.duplicate_every == 1:
            raise ValueError("duplicate_every must be 0 (no duplicates) or >= 2")

    def url_number(self, i: int) -> int:
        """Which URL item ``i`` carries: its own, or (every ``duplicate_every``-th) an earlier original's."""
        if not self.duplicate_every or i == 0 or i % self.duplicate_every:
            return i
        earlier = i // 2
        return earlier + 1 if earlier % self.duplicate_every == 0 else earlier  # an original, never a repeat

    @staticmethod
    def label_name(index: int) -> str:
        return f"species_{index:03d}"

    def item(self, i: int) -> dict[str, Any]:
        source = self.url_number(i)
        return {
            "id": f"t{i}",
            "image_url": f"{self.url_prefix}{source:09d}.jpg",
            "label": self._slots[(source * _MIX) % len(self._slots)],
        }

    def __call__(self, offset: int, limit: int) -> list[dict[str, Any]]:
        return [self.item(i) for i in range(offset, min(offset + limit, self.total))]

    def unique_urls(self) -> int:
        """How many distinct URLs the catalog holds (for checking a snapshot's row count)."""
        if not self.duplicate_every:
            return self.total
        # Every item 1.. that is a multiple of duplicate_every repeats an earlier original.
        return self.total - max(0, (self.total - 1) // self.duplicate_every)
