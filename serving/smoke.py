"""The fixed smoke set: templates every freshly started server must answer in the trained format.

Kept apart from the launcher so the tiny demo adapter (tests, benchmarks) trains on the same set.
The labels and rationales are only used to train that demo adapter; the smoke rule checks format
validity and that the adapter moves the base model's next-token distributions, not correctness.
"""

from __future__ import annotations

# (dataset, template, label, short rationale)
SMOKE_SET: tuple[tuple[str, str, str, str], ...] = (
    ("bgl", "instruction cache parity error corrected", "normal",
     "The KERNEL reports a cache parity error that hardware corrected; no service is lost."),
    ("bgl", "<*> exited abnormally due to signal: Aborted", "abnormal",
     "A job process was aborted by a signal; the application failed."),
    ("bgl", "generating core.<*>", "normal",
     "ciod writes a core file after a job ends; this is routine bookkeeping."),
    ("bgl", "machine check interrupt (bit=0x1d): L2 dcache unit data parity error", "abnormal",
     "A machine check on the L2 data cache is a hardware failure."),
    ("spirit", "resize_dma_pool: unknown device type 12", "normal",
     "A driver message about DMA pool sizing at boot; informational only."),
    ("spirit", "cciss: cmd <*> has CHECK CONDITION, sense key = 0x3", "abnormal",
     "The disk controller reports a medium error; storage hardware is failing."),
    ("hdfs", "Receiving block <*> src: /<*> dest: /<*>", "normal",
     "A DataNode receives a block replica; normal write traffic."),
    ("hdfs", "Exception in receiveBlock for block <*> <*>", "abnormal",
     "The DataNode failed while receiving a block; a software exception."),
)

SMOKE_TEMPLATES: tuple[tuple[str, str], ...] = tuple((dataset, template) for dataset, template, _, _ in SMOKE_SET)
