"""What a person should look at: per class, a uniform random sample plus the most informative items.

The unit of review is an image (one Label Studio task). Per class (the detector's phrase) the queue holds:

* ``uniform``: images with a kept instance of the class, chosen by a seeded hash of the image id, the
  same draw whatever else is in the queue. Their reviews estimate the class's precision without bias.
* ``near_threshold``: candidates, kept or dropped by a score threshold, whose scores are closest to
  flipping the decision (for a kept candidate: its smallest margin above a threshold; for a dropped one:
  how far its failing scores are below theirs).
* ``score_disagreement``: candidates whose scores disagree, one well above its threshold and another
  well below (a confident box with a poor mask, or the reverse).

Selection streams over shards with a bounded heap per (reason, class), so memory does not grow with the
number of shards. An image chosen for several reasons appears once, with every reason and every chosen
candidate. The task shows the image's kept instances plus the chosen dropped candidates, so a reviewer's
"keep" on a dropped one is evidence for a looser threshold.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pseudolabel.labels.coco import EMPTY_PHRASE_NAME
from pseudolabel.labels.relabel import KEPT
from pseudolabel.labels.thresholds import Thresholds

REASONS = ("uniform", "near_threshold", "score_disagreement")
SCORES = ("box_score", "text_score", "mask_score")
# Decisions a score threshold made: only these candidates can flip when a threshold moves.
SCORE_DECISIONS = (KEPT, *SCORES)

QUEUE_COLUMNS = ["image_id", "shard", "phrase", "reason", "priority", "candidate_id"]


@dataclass(frozen=True)
class QueueSizes:
    """Images per class and reason (an image picked twice counts once in the final queue)."""

    uniform: int = 20
    near_threshold: int = 10
    score_disagreement: int = 5

    def __post_init__(self) -> None:
        if min(self.uniform, self.near_threshold, self.score_disagreement) < 0:
            raise ValueError(f"queue sizes must be >= 0, got {self}")

    def of(self, reason: str) -> int:
        return int(getattr(self, reason))


def hash_rank(image_id: str, seed: int) -> int:
    """A seeded, uniform 64-bit rank of an image id: the uniform sample takes the smallest."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{image_id}".encode()).digest()[:8], "big")


def class_thresholds(thresholds: Thresholds, phrases: pd.Series) -> pd.DataFrame:
    """Per candidate, the score thresholds of its class (columns named like :data:`SCORES`)."""
    table = {}
    for phrase in pd.unique(phrases):
        rules = thresholds.for_class(phrase)
        table[phrase] = [getattr(rules, score) for score in SCORES]
    frame = pd.DataFrame.from_dict(table, orient="index", columns=list(SCORES))
    return frame.loc[phrases.to_numpy()].reset_index(drop=True)


def review_signals(candidates: pd.DataFrame, thresholds: Thresholds) -> pd.DataFrame:
    """``flip_distance`` and ``disagreement`` per candidate (NaN where it does not apply).

    ``candidates`` are a :class:`~pseudolabel.labels.relabel.RelabelResult`'s candidates (scores and a
    ``decision``). A score the backend does not make (NaN) takes no part.
    """
    phrases = candidates["phrase"].fillna("").reset_index(drop=True)
    limits = class_thresholds(thresholds, phrases)
    margins = np.stack(
        [
            candidates[s].to_numpy(dtype=np.float64, na_value=np.nan) - limits[s].to_numpy(np.float64)
            for s in SCORES
        ],
        axis=1,
    )
    decision = candidates["decision"].astype(str).to_numpy()
    finite = np.isfinite(margins)
    any_score = finite.any(axis=1)
    kept = decision == KEPT
    with np.errstate(invalid="ignore"):
        above = np.where(finite, margins, np.inf).min(axis=1)  # a kept candidate's closest margin
        deficit = np.where(finite & (margins < 0), -margins, 0.0).sum(axis=1)  # what a dropped one lacks
        high = np.where(finite, margins, -np.inf).max(axis=1)
        low = np.where(finite, margins, np.inf).min(axis=1)
    flip = np.where(kept, above, deficit)
    flip[~np.isin(decision, SCORE_DECISIONS) | ~any_score] = np.nan
    disagreement = np.where((high > 0) & (low < 0), high - low, np.nan)
    return pd.DataFrame({"flip_distance": flip, "disagreement": disagreement})


@dataclass
class ReviewSelector:
    """Streams shards in, keeps the best ``sizes`` images per (reason, class)."""

    sizes: QueueSizes = field(default_factory=QueueSizes)
    seed: int = 0
    # (reason, phrase) -> heap of (-priority, tiebreak, image_id, shard, candidate_id): the worst on top.
    _heaps: dict[tuple[str, str], list] = field(default_factory=dict)

    def add_shard(self, shard: str, candidates: pd.DataFrame, thresholds: Thresholds) -> None:
        """Offer one shard's candidates (a RelabelResult's ``candidates``)."""
        if candidates.empty:
            return
        frame = candidates.reset_index(drop=True)
        phrases = frame["phrase"].fillna("").replace("", EMPTY_PHRASE_NAME).to_numpy(dtype=object)
        signals = review_signals(frame, thresholds)
        ids = frame["image_id"].to_numpy(dtype=object)
        candidate_ids = frame["candidate_id"].to_numpy(np.int64)
        kept = frame["decision"].astype(str).to_numpy() == KEPT

        # uniform: one entry per (image, class) with a kept instance; smallest hash rank first.
        seen: set[tuple[str, str]] = set()
        for i in np.flatnonzero(kept):
            key = (ids[i], phrases[i])
            if key not in seen:
                seen.add(key)
                rank = hash_rank(ids[i], self.seed)
                self._offer("uniform", phrases[i], -float(rank), ids[i], shard, -1)
        for reason, values, smaller_first in (
            ("near_threshold", signals["flip_distance"].to_numpy(), True),
            ("score_disagreement", signals["disagreement"].to_numpy(), False),
        ):
            for i in np.flatnonzero(np.isfinite(values)):
                priority = -values[i] if smaller_first else values[i]
                self._offer(reason, phrases[i], float(priority), ids[i], shard, int(candidate_ids[i]))

    def _offer(
        self, reason: str, phrase: str, priority: float, image_id: str, shard: str, candidate: int
    ) -> None:
        size = self.sizes.of(reason)
        if size == 0:
            return
        heap = self._heaps.setdefault((reason, phrase), [])
        entry = (priority, image_id, candidate, shard)
        if len(heap) < size:
            heapq.heappush(heap, entry)
        elif entry > heap[0]:
            heapq.heapreplace(heap, entry)

    def queue(self) -> pd.DataFrame:
        """One row per chosen (image, reason, class, candidate), best first within each reason and class;
        ``candidate_id`` is -1 for the uniform sample (the whole image is the item)."""
        rows = []
        for (reason, phrase), heap in sorted(self._heaps.items()):
            for priority, image_id, candidate, shard in sorted(heap, reverse=True):
                rows.append((image_id, shard, phrase, reason, priority, candidate))
        return pd.DataFrame(rows, columns=QUEUE_COLUMNS)


def select_for_review(
    shards: Iterable[tuple[str, pd.DataFrame]],
    thresholds: Thresholds,
    sizes: QueueSizes | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """The review queue (:data:`QUEUE_COLUMNS`) over ``(shard, candidates)`` pairs."""
    selector = ReviewSelector(sizes or QueueSizes(), seed)
    for shard, candidates in shards:
        selector.add_shard(shard, candidates, thresholds)
    return selector.queue()
