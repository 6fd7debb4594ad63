"""drain3's Drain with the project's wildcard rule and the drain3 0.9.3 fix for short templates.

Wildcard rule (issue 15, case 1): **a `<*>` stands for a value, never for a word.** drain3 merges lines
whose tokens agree at `sim_th` of their positions and writes `<*>` where they differ, so
`node card R12-M0-N4 status: OK` and `node card R12-M0-N4 status: FAILED` became one template
`node card R12-M0-N4 status: <*>`, and the FAILED line inherited the verdict of the OK lines. Here two
differing tokens may merge into `<*>` only when both carry a value: a digit, or a mask `<*>` from the
regex masks (tasks.detection.formats.MASKS), the same test drain3 uses to route tokens (`has_numbers`). A token
without a digit (`OK`/`FAILED`, `Started`/`Paused`, `user=alice`/`user=bob`, `sda`/`sdb`) is part of
the template's text: lines that differ there are different templates, and such a token never fills an
existing `<*>`. Cost: where a word really is a variable (user or device names) each spelling is one more
template, asked once and then cached; the other way round a failure is hidden in a normal template.

Short-template fix: drain3 0.9.1's `add_seq_to_prefix_tree` compares `current_depth == token_count` with
`token_count` a str, so a template with fewer tokens than the tree's depth is never put in a leaf and is
never matched again: `Exiting` three times makes three clusters, the saved state grows on every run, and
each compact JSON line (one whitespace token) costs one cluster and one cache row. Fixed upstream in
drain3 0.9.3 (logpai/Drain3 commit 6ed914f, "fix: comparison of type int with type str in function
add_seq_to_prefix_tree #28"); the method below is that version (MIT licence, (c) 2020 IBM). The project
cannot upgrade: drain3 >= 0.9.2 pins cachetools==4.2.1 and jsonpickle==1.5.1, and mlflow 3.17 requires
cachetools>=5 (checked against the drain3 0.9.3 and 0.9.11 sdists on PyPI).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from drain3.drain import Drain, LogCluster, Node, param_str

RULES = "value-wildcards/1"  # stored with the state; a state mined under other rules is not reused
_VALUE = re.compile(r"\d|<\*>")


def carries_value(token: str) -> bool:
    """True for a token a wildcard may stand for: it holds a digit or a masked value (`<*>`)."""
    return _VALUE.search(token) is not None


class ValueDrain(Drain):
    """Drain whose wildcards replace values only, with drain3 0.9.3's prefix-tree fix."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rules = RULES

    def get_seq_distance(self, seq1: Sequence[str], seq2: Sequence[str]) -> tuple[float, int]:  # type: ignore[override]
        """(share of equal tokens, wildcard count) of template `seq1` against line `seq2`, as drain3 computes
        it; (-1.0, n), below any threshold, when they differ at a token that carries no value."""
        sim_tokens = param_count = 0
        for template_token, token in zip(seq1, seq2, strict=True):
            if template_token == param_str:
                if not carries_value(token):
                    return -1.0, param_count
                param_count += 1
            elif template_token == token:
                sim_tokens += 1
            elif not (carries_value(template_token) and carries_value(token)):
                return -1.0, param_count
        return sim_tokens / len(seq1), param_count

    def add_seq_to_prefix_tree(self, root_node: Node, cluster: LogCluster) -> None:
        """drain3 0.9.3's version (see the module docstring): a short template reaches its leaf."""
        token_count_str = str(len(cluster.log_template_tokens))
        if token_count_str not in root_node.key_to_child_node:
            first_layer_node = Node()
            root_node.key_to_child_node[token_count_str] = first_layer_node
        else:
            first_layer_node = root_node.key_to_child_node[token_count_str]

        parent_node = first_layer_node

        # handle case of empty log string
        if len(cluster.log_template_tokens) == 0:
            parent_node.cluster_ids = [cluster.cluster_id]
            return

        current_depth = 1
        for token in cluster.log_template_tokens:

            # if at max depth or this is last token in template - add current log cluster to the leaf node
            if current_depth == self.depth or str(current_depth) == token_count_str:
                # clean up stale clusters before adding a new one.
                new_cluster_ids = [cluster.cluster_id]
                for cluster_id in parent_node.cluster_ids:
                    if cluster_id in self.id_to_cluster:
                        new_cluster_ids.append(cluster_id)
                parent_node.cluster_ids = new_cluster_ids
                break

            # if token not matched in this layer of existing tree.
            if token not in parent_node.key_to_child_node:
                if not self.has_numbers(token):
                    if param_str in parent_node.key_to_child_node:
                        if len(parent_node.key_to_child_node) < self.max_children:
                            new_node = Node()
                            parent_node.key_to_child_node[token] = new_node
                            parent_node = new_node
                        else:
                            parent_node = parent_node.key_to_child_node[param_str]
                    else:
                        if len(parent_node.key_to_child_node) + 1 < self.max_children:
                            new_node = Node()
                            parent_node.key_to_child_node[token] = new_node
                            parent_node = new_node
                        elif len(parent_node.key_to_child_node) + 1 == self.max_children:
                            new_node = Node()
                            parent_node.key_to_child_node[param_str] = new_node
                            parent_node = new_node
                        else:
                            parent_node = parent_node.key_to_child_node[param_str]

                else:
                    if param_str not in parent_node.key_to_child_node:
                        new_node = Node()
                        parent_node.key_to_child_node[param_str] = new_node
                        parent_node = new_node
                    else:
                        parent_node = parent_node.key_to_child_node[param_str]

            # if the token is matched
            else:
                parent_node = parent_node.key_to_child_node[token]

            current_depth += 1
