"""drain3 with the project's rules: masks for values, ValueDrain (wildcards for values only), checkpointed state."""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import jsonpickle
from drain3 import TemplateMiner
from drain3.file_persistence import FilePersistence
from drain3.masking import MaskingInstruction
from drain3.template_miner_config import TemplateMinerConfig
from filelock import FileLock, Timeout

from tasks.common.errors import InputError
from tasks.common.files import atomic_path
from tasks.detection.drain_rules import RULES, ValueDrain
from tasks.detection.formats import MASKS


class _AtomicFilePersistence(FilePersistence):
    """drain3's FilePersistence, written all-or-nothing so a crash cannot leave a half-written state."""

    def save_state(self, state: bytes) -> None:
        with atomic_path(self.file_path) as tmp:
            tmp.write_bytes(state)


class _CheckpointMiner(TemplateMiner):
    """TemplateMiner that snapshots at checkpoints (end of each chunk) instead of on every new cluster.

    Its Drain is tasks.detection.drain_rules.ValueDrain (wildcards for values only, drain3 0.9.3's short-template
    fix). A saved state mined under other rules is not reused: the miner starts afresh and says so in
    `state_reset` (template ids restart; verdicts stay cached by template text).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.dirty = False
        self.state_reset: str | None = None
        super().__init__(*args, **kwargs)
        if not isinstance(self.drain, ValueDrain):
            config = self.config
            self.drain = ValueDrain(sim_th=config.drain_sim_th, depth=config.drain_depth,
                                    max_children=config.drain_max_children, max_clusters=config.drain_max_clusters,
                                    extra_delimiters=config.drain_extra_delimiters, profiler=self.profiler)

    def load_state(self) -> None:
        """drain3 0.9.1's load_state renames dict keys while iterating them (a RuntimeError on Python 3.11)."""
        state = self.persistence_handler.load_state()
        if state is None:
            return
        if self.config.snapshot_compress_state:
            state = zlib.decompress(base64.b64decode(state))
        drain = jsonpickle.loads(state)
        if not isinstance(drain, ValueDrain) or getattr(drain, "rules", None) != RULES:
            self.state_reset = (f"{getattr(self.persistence_handler, 'file_path', 'drain state')} was mined under "
                                f"older template rules; templates are mined afresh under {RULES}")
            return
        drain.id_to_cluster = {int(key): cluster for key, cluster in drain.id_to_cluster.items()}
        drain.profiler = self.profiler
        self.drain = drain

    def get_snapshot_reason(self, change_type: str, cluster_id: int) -> str | None:
        self.dirty = self.dirty or change_type != "none"
        return None

    def checkpoint(self) -> None:
        if self.dirty and self.persistence_handler is not None:
            self.save_state("checkpoint")
            self.dirty = False


def make_miner(state_file: Path | None, sim_th: float = 0.4, depth: int = 4) -> _CheckpointMiner:
    """A drain3 miner with the project's masks (values become `<*>`), checkpointed to `state_file` when given."""
    config = TemplateMinerConfig()
    config.drain_sim_th, config.drain_depth = sim_th, depth
    config.masking_instructions = [MaskingInstruction(pattern, "*") for pattern in MASKS]  # masks read "<*>"
    persistence = None
    if state_file is not None:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        persistence = _AtomicFilePersistence(str(state_file))
    return _CheckpointMiner(persistence, config)


def hold_drain_state(state_file: Path) -> FileLock:
    """Hold `state_file` for one detect run: its templates and ids are this run's alone (issue 21, case 9).

    Two runs mining into one drain state would give colliding template ids and overwrite each other's snapshot
    (LogLead PR 41, Drain3#108). The lock is an OS file lock on `<state>.lock` (filelock), freed when the process
    ends however it ends; who holds it is written beside it (`<state>.holder`: pid, command, start time).
    Returns the held lock (release it when the run ends). Raises InputError naming the state file and its holder
    when another run holds it.
    """
    state_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(state_file) + ".lock")
    holder_file = Path(str(state_file) + ".holder")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            holder = json.loads(holder_file.read_text(encoding="utf-8"))
            who = f"pid {holder['pid']} (`{holder['command']}`, since {holder['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            who = "another process"
        raise InputError(state_file, f"the drain state is in use by {who}",
                         hint="wait for that run to end, or give this run its own state: --drain-state PATH "
                              "(templates of the two runs are then numbered separately)") from None
    holder_file.write_text(json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv)[:200],
                                       "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}), encoding="utf-8")
    return lock
