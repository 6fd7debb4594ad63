"""Retrieval quality: what the prompts' neighbours show, per dataset (issue 18, item 2).

For a set of (template, dataset, 0/1 label) queries and an index (tasks.common.retrieval.TemplateIndex, whose
own policy decides what a prompt shows), per dataset:
- `recall_at_k`: share of prompts showing at least one neighbour with the query's label (and the same over the
  abnormal queries alone, `recall_at_k_abnormal`, since they are few);
- `top1_agreement`: share of prompts whose most similar shown neighbour has the query's label;
- `shown_any`: share of prompts showing any neighbour; `mean_shown`: neighbours per prompt;
- `other_system`: share of shown neighbours from another dataset than the query's (case-insensitive);
- `below_floor`: share of prompts showing a neighbour below the index's similarity floor (0 by construction;
  counted to prove it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tasks.common.retrieval import TemplateIndex, system_key


def retrieval_quality(index: TemplateIndex, items: Sequence[tuple[str, str, int]],
                      k: int | None = None) -> dict[str, dict[str, Any]]:
    """{dataset: figures (see the module docstring), plus `n` and `abnormal`}, rounded to 4 places; `k` None
    uses the index's own. Shares are over prompts, except `other_system` (over shown neighbours; None when
    nothing is shown). An empty `items` gives {}."""
    if not items:
        return {}
    found = index.shown([t for t, _, _ in items], [d for _, d, _ in items], k)
    floor = index.policy()["floor"]
    rows: dict[str, list[tuple[int, list[Any]]]] = {}
    for (_, dataset, label), near in zip(items, found, strict=True):
        rows.setdefault(str(dataset), []).append((int(label), near))
    out = {}
    for dataset, pairs in rows.items():
        n = len(pairs)
        shown = [near for _, near in pairs]
        hits = [any(m.label == y for m in near) for y, near in pairs]
        abnormal = [h for h, (y, _) in zip(hits, pairs, strict=True) if y == 1]
        total = sum(len(near) for near in shown)
        other = sum(system_key(m.dataset) != system_key(dataset) for near in shown for m in near)
        out[dataset] = {
            "n": n, "abnormal": len(abnormal),
            "recall_at_k": round(sum(hits) / n, 4),
            "recall_at_k_abnormal": round(sum(abnormal) / len(abnormal), 4) if abnormal else None,
            "top1_agreement": round(sum(bool(near) and near[0].label == y for y, near in pairs) / n, 4),
            "shown_any": round(sum(bool(near) for near in shown) / n, 4),
            "mean_shown": round(total / n, 4),
            "other_system": round(other / total, 4) if total else None,
            "below_floor": round(sum(floor is not None and any(m.similarity < floor for m in near)
                                     for near in shown) / n, 4),
        }
    return out


def quality_table(quality: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines: one row per dataset of `retrieval_quality`'s figures."""
    def cell(value: Any) -> str:
        return "—" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| dataset | n | recall@k | recall@k (abnormal) | top-1 agrees | shows any | mean shown | other system "
             "| below floor |", "|---|---|---|---|---|---|---|---|---|"]
    for dataset, q in quality.items():
        lines.append("| " + " | ".join([dataset, *(cell(q[f]) for f in (
            "n", "recall_at_k", "recall_at_k_abnormal", "top1_agreement", "shown_any", "mean_shown",
            "other_system", "below_floor"))]) + " |")
    return lines
