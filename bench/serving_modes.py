"""LoRA serving against merged weights on the vLLM endpoint: templates/s for the same templates, as a ratio.

    python bench/serving_modes.py [--version-dir DIR] [--n 96] [--concurrency 8]

Both modes serve the same version (its adapter, threshold and index) through `rationanomaly`'s own deploy,
one after the other on the same port pair, so they never share the CPU. Each answers the same BGL_2k and
Thunderbird_2k templates through the project's client twice: score only (`detect.rationales: none`) and
with a rationale for each abnormal verdict (the `detect` default). Baseline: LoRA (`serve.merged: false`).
Also printed: how often the two modes give the same verdict (merging rounds the weights once more).

`--version-dir`: a version's artifacts folder (adapter/, calibration.json, index/), default the newest one
`rationanomaly serve` downloaded under .serve/models; without one, the tests' tiny demo adapter.
Aim (issue 13): 10 templates/s on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

from _live import ROOT, base_model_dir, mirror


def templates(n: int) -> list[tuple[str, str]]:
    """Up to n (dataset, template) pairs, alternating BGL_2k and Thunderbird_2k (loghub's unique templates)."""
    found: list[list[tuple[str, str]]] = []
    for dataset, name in (("bgl", "BGL/BGL_2k.log_structured.csv"),
                          ("thunderbird", "Thunderbird/Thunderbird_2k.log_structured.csv")):
        path = mirror() / "loghub" / name
        if not path.is_file():
            raise SystemExit(f"{path} not found (the mirror: RATIONANOMALY_MIRROR)")
        with path.open(encoding="utf-8") as handle:
            unique = dict.fromkeys(row["EventTemplate"] for row in csv.DictReader(handle))
        found.append([(dataset, template) for template in unique])
    mixed = [item for pair in zip(*found, strict=False) for item in pair]
    return mixed[:n]


def newest_version_dir() -> Path | None:
    folders = sorted((ROOT / ".serve" / "models").glob("*/*/artifacts"), key=lambda p: p.stat().st_mtime)
    return folders[-1] if folders else None


def main() -> None:
    from serving import server
    from serving.client import client_for, endpoint_from_state
    from serving.resolve import local_model_ref
    from serving.tiny_adapter import cached_tiny_adapter
    from tasks.common.settings import load_settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version-dir", type=Path, default=None)
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--port", type=int, default=8875)
    args = parser.parse_args()

    settings = load_settings(ROOT / "params.yaml")
    base = base_model_dir()
    version_dir = args.version_dir or newest_version_dir()
    if version_dir is None:
        version_dir = cached_tiny_adapter(base, ROOT / ".cache" / "test-assets")
        print("no downloaded version under .serve/models: serving the tests' tiny demo adapter")
    ref = local_model_ref(settings.registry.model_name, "bench", base, version_dir)
    items = templates(args.n)
    print(f"version {version_dir} (threshold {ref.threshold}, {ref.neighbours} neighbours); "
          f"{len(items)} templates, concurrency {args.concurrency}", flush=True)

    rates: dict[tuple[str, str], float] = {}
    verdicts: dict[str, list[str | None]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-modes-") as folder:
        for mode, merged in (("lora", False), ("merged", True)):
            params = settings.serve.model_copy(update={
                "state_file": f"{folder}/state.json", "log_dir": f"{folder}/logs", "merged_dir": f"{folder}/merged",
                "port": args.port, "merged": merged})
            started = time.perf_counter()
            server.deploy(ref, params)
            print(f"{mode:6}: deployed in {time.perf_counter() - started:.0f} s (merge, start, health, smoke)",
                  flush=True)
            try:
                endpoint = endpoint_from_state(params.state_file)
                for rationales in ("none", "abnormal"):
                    with client_for(endpoint, settings.detect, concurrency=args.concurrency,
                                    rationales=rationales) as client:
                        started = time.perf_counter()
                        answers = client.classify(items)
                        rates[mode, rationales] = len(items) / (time.perf_counter() - started)
                    if rationales == "none":
                        verdicts[mode] = [a.verdict for a in answers]
                    print(f"{mode:6} rationales={rationales:8}: {rates[mode, rationales]:6.2f} templates/s", flush=True)
            finally:
                server.stop(params)

    same = sum(a == b for a, b in zip(verdicts["lora"], verdicts["merged"], strict=True)) / len(items)
    for rationales in ("none", "abnormal"):
        ratio = rates["merged", rationales] / rates["lora", rationales]
        print(f"merged / lora, rationales={rationales:8}: {ratio:.2f}x")
    print(f"same verdict in both modes: {same:.1%} of {len(items)} templates")


if __name__ == "__main__":
    main()
