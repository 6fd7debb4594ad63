"""Checkpoints and the published adapter: resume a killed run only when its fingerprint matches, and swap the
adapter folder in all-or-nothing."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.common.files import atomic_dir, write_json_atomic
from tasks.training.launch import barrier, is_main_process
from tasks.training.model import adapter_digest

FINGERPRINT_FILE = "fingerprint.json"


@dataclass
class Resume:
    """Where a run starts: `checkpoint` is None for a fresh start; `step` is the checkpoint's global step."""

    checkpoint: str | None
    step: int = 0
    reason: str = ""
    fingerprint: str = field(default="", repr=False)

def _complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """checkpoint-N folders the Trainer finished writing (trainer_state.json is its last file)."""
    found = []
    for path in ckpt_dir.glob("checkpoint-*"):
        try:
            step = int(path.name.rsplit("-", 1)[1])
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (ValueError, OSError):
            continue
        found.append((step, path))
    return sorted(found)

def prepare_checkpoints(ckpt_dir: Path, fingerprint: str, mode: str | bool | None) -> Resume:
    """Pick the checkpoint to resume from, or clear the folder for a fresh start.

    `mode` (the `resume` setting): "auto" resumes from the newest complete checkpoint when its fingerprint (params,
    data and base-model hashes) matches this run's; anything else is wiped. false/"never" always starts fresh.
    """
    mode = "auto" if mode == "auto" else "never"
    stored = ckpt_dir / FINGERPRINT_FILE
    old = json.loads(stored.read_text(encoding="utf-8")).get("fingerprint") if stored.exists() else None
    checkpoints = _complete_checkpoints(ckpt_dir) if ckpt_dir.exists() else []
    barrier()  # every rank has read the folder before rank 0 may clear it
    if mode == "auto" and old == fingerprint and checkpoints:
        step, path = checkpoints[-1]
        return Resume(str(path), step, f"resuming from {path.name} (same params, data and base model)", fingerprint)
    reason = (
        "fresh start"
        if not checkpoints
        else "fresh start (resume disabled)"
        if mode == "never"
        else "fresh start (checkpoints were made with other params/data; removed)"
    )
    if is_main_process():
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        stored.write_text(json.dumps({"fingerprint": fingerprint}) + "\n", encoding="utf-8")
    barrier()
    return Resume(None, 0, reason, fingerprint)

def publish_adapter(trainer: Any, out_dir: Path, meta: Callable[[str], dict[str, Any]]) -> str | None:
    """Save the trained adapter + tokenizer to `out_dir` all-or-nothing; returns its tensor digest on rank 0.

    Every rank calls `save_model` into one fixed staging folder (under FSDP it gathers the sharded weights);
    rank 0 then writes training_meta.json from `meta(digest)` (which may raise to refuse publishing: the old
    `out_dir` then stays) and swaps the folder in. Other ranks return None.
    """
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    swap = atomic_dir(out_dir, staging=staging) if is_main_process() else contextlib.nullcontext(staging)
    with swap:
        trainer.accelerator.wait_for_everyone()
        trainer.save_model(str(staging))
        trainer.accelerator.wait_for_everyone()
        if not is_main_process():
            return None
        (staging / "training_args.bin").unlink(missing_ok=True)
        digest = adapter_digest(staging)
        write_json_atomic(staging / "training_meta.json", meta(digest))
    return digest
