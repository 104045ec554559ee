"""Counting rejected rows/pages by reason, with a few examples each, so nothing is dropped silently."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

EXAMPLES_PER_REASON = 3
EXAMPLE_CHARS = 200  # an example is a repr, cut short: items can be arbitrarily large


@dataclass
class ReasonTally:
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def add(self, reason: str, offset: int, value: object = None) -> None:
        self.counts[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < EXAMPLES_PER_REASON:
            kept.append({"offset": offset, "value": _short_repr(value)})

    def merge(self, other: ReasonTally) -> None:
        self.counts.update(other.counts)
        for reason, examples in other.examples.items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(examples[: EXAMPLES_PER_REASON - len(kept)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: counts by reason (most frequent first) and their examples."""
        return {
            "total": self.total,
            "counts": dict(self.counts.most_common()),
            "examples": {reason: self.examples[reason] for reason, _ in self.counts.most_common()},
        }


def _short_repr(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= EXAMPLE_CHARS else text[: EXAMPLE_CHARS - 3] + "..."
