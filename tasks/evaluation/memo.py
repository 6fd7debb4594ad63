"""The answer memo: a model's answer to an exact prompt, kept on disk so the same question is never asked twice.

An evaluation asks the same questions again and again: the weekly retrain re-scores the zero-shot base model on
unchanged prompts, an index-only release (issue 20) re-measures a kept adapter whose prompts changed only where
the new labels are shown, and an evaluate rerun after a change to the evaluation's own code asks everything
again. Greedy decoding and a single forward pass are deterministic for one engine, model and prompt, so the
answer is a function of exactly these; the memo keys on all of them:

- the kind of answer (`logprobs`: the verdict task's next-token log-probabilities; `generate`: a completion),
- the engine (`vllm` or `transformers`: their numerics differ), the dtype and, for a completion, the answer
  budget (max new tokens),
- the content digest of the base model's and the adapter's weight and config files (`weights_digest`: a
  downloaded copy of a registered adapter is the same adapter; a retrained one is not),
- the prompt's token ids (the chat template, the log text, the neighbours shown, the verdict asked about).

Stored with diskcache (SQLite underneath, safe across processes, bounded by `size_gib` with least-recently-
stored eviction). params.yaml `evaluate.answer_memo` names the folder (null: no memo).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

_T = TypeVar("_T")

# Files whose content decides a model's answers (weights and configs); tokenizer files only shape the prompt ids,
# which are part of the key themselves, and README, calibration or lineage files beside an adapter change nothing.
WEIGHT_FILES = ("*.safetensors", "*.bin", "config.json", "adapter_config.json", "generation_config.json")
_digests: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        with path.open("rb") as handle:
            _digests[key] = hashlib.file_digest(handle, "sha256").hexdigest()
    return _digests[key]


def weights_digest(folder: str | Path | None) -> str:
    """sha256 over the names and contents of a model folder's WEIGHT_FILES ("" for None: no adapter).
    Memoised per (path, size, mtime) within the process: a 270 MB base model is hashed once."""
    if folder is None:
        return ""
    root = Path(folder)
    files = sorted({p for pattern in WEIGHT_FILES for p in root.glob(pattern) if p.is_file()})
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + _file_digest(path).encode() + b"\0")
    return digest.hexdigest()


class AnswerMemo:
    """Answers by key in a diskcache folder; `hits` and `misses` count this process's lookups."""

    def __init__(self, folder: str | Path, size_gib: float = 1.0) -> None:
        from diskcache import Cache

        self.folder = Path(folder)
        self.cache = Cache(str(self.folder), size_limit=int(size_gib * 2**30))
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(kind: str, model: dict[str, Any], prompt: Sequence[int]) -> str:
        """sha256 of the answer kind, the model description (engine, digests, dtype, budget) and the prompt ids."""
        text = json.dumps([kind, model, list(prompt)], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def answers(self, kind: str, model: dict[str, Any], prompts: Sequence[Sequence[int]],
                ask: Callable[[list[list[int]]], list[_T]]) -> list[_T]:
        """Each prompt's answer: from the memo where it holds one, else from `ask(the missing prompts)` (one call,
        in order), stored as it comes back. The list is in the order of `prompts`."""
        keys = [self.key(kind, model, p) for p in prompts]
        found: dict[int, Any] = {}
        for i, key in enumerate(keys):
            value = self.cache.get(key, default=None)
            if value is not None:
                found[i] = value
        missing = [i for i in range(len(prompts)) if i not in found]
        self.hits += len(found)
        self.misses += len(missing)
        if missing:
            fresh = ask([list(prompts[i]) for i in missing])
            for i, value in zip(missing, fresh, strict=True):
                self.cache.set(keys[i], value)
                found[i] = value
        return [found[i] for i in range(len(prompts))]

    def close(self) -> None:
        self.cache.close()
