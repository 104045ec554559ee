"""Human review of pseudo-labels: images and their predicted masks go to a Label Studio project, and the
reviewers' annotations come back (:mod:`label_studio`, a plain-httpx REST client). Dagster-free.
"""
