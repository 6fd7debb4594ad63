"""detect throughput on BGL_2k replayed 50 times: warm cache vs cold, and vs a naive client that sends every line.

    python bench/detect.py [--replays 50] [--naive-lines 48]

cold  = empty verdict cache and drain state: every new template goes to the vLLM endpoint.
warm  = the same run again (cache and drain state on disk, new process state): no model calls.
naive = one request per line; measured on the first --naive-lines lines and extrapolated to the whole input.
Endpoint: the project's live server if healthy, else a temporary one with the tiny demo adapter.
Goals (issue 5): warm >= 50,000 lines/s on 2 cores and >= 100x the naive client.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

from _live import ROOT, live_server, mirror


def bgl_2k() -> Path:
    for candidate in (ROOT / "data/raw/loghub/BGL/BGL_2k.log", mirror() / "loghub/BGL/BGL_2k.log"):
        if candidate.is_file():
            return candidate
    raise SystemExit("BGL_2k.log not found (data/raw or the mirror)")


def main() -> None:
    from serving.client import client_for, endpoint_from_state
    from serving.detect import http_detector
    from tasks.common.settings import load_settings
    from tasks.detection.formats import FORMATS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--naive-lines", type=int, default=48)
    args = parser.parse_args()

    text = bgl_2k().read_bytes()
    text = text if text.endswith(b"\n") else text + b"\n"
    data = text * args.replays
    total = data.count(b"\n")
    with tempfile.TemporaryDirectory(prefix="bench-detect-") as folder, live_server() as live:
        endpoint = endpoint_from_state(live["state_file"])
        params = load_settings(ROOT / "params.yaml").detect.model_copy(
            update={"cache_file": f"{folder}/cache.sqlite", "drain_state": f"{folder}/drain.bin"})

        def run(**overrides: object) -> dict:
            with http_detector(params.model_copy(update=overrides), endpoint, progress=False) as detector:
                started = time.perf_counter()
                summary = detector.run(io.BytesIO(data), io.StringIO())
                summary["wall_s"] = time.perf_counter() - started
            return summary

        print(f"input: BGL_2k x {args.replays} = {total:,} lines; endpoint {endpoint.base_url} "
              f"(model {endpoint.model} v{endpoint.version})", flush=True)
        cold = run()
        print(f"cold : {cold['wall_s']:8.1f} s  {total / cold['wall_s']:>10,.0f} lines/s  "
              f"({cold['requested']} templates sent to the model)", flush=True)
        warm = run()
        print(f"warm : {warm['wall_s']:8.2f} s  {total / warm['wall_s']:>10,.0f} lines/s  "
              f"({warm['requested']} requests)", flush=True)
        warm_nomemo = run(memo_size=0)
        print(f"warm without the content memo (drain3 on every line): {total / warm_nomemo['wall_s']:,.0f} lines/s",
              flush=True)

        pattern = FORMATS["bgl"][0]
        lines = text.decode("utf-8", errors="replace").splitlines()[: args.naive_lines]
        contents = [("bgl", match.group("content") if (match := pattern.match(line)) else line) for line in lines]
        with client_for(endpoint, params) as client:
            started = time.perf_counter()
            client.classify(contents)
            naive_s = time.perf_counter() - started
        naive_rate = len(contents) / naive_s
        print(f"naive: {naive_rate:,.2f} lines/s measured on {len(contents)} lines at concurrency "
              f"{params.concurrency}; extrapolated to {total:,} lines: {total / naive_rate / 3600:,.1f} h",
              flush=True)

    warm_rate = total / warm["wall_s"]
    print()
    print(f"warm / cold  : {cold['wall_s'] / warm['wall_s']:,.0f}x")
    print(f"warm / naive : {warm_rate / naive_rate:,.0f}x   (goal >= 100x; naive extrapolated from a subset)")
    print(f"warm lines/s : {warm_rate:,.0f}   (goal >= 50,000 on 2 cores) "
          f"{'MET' if warm_rate >= 50_000 else 'NOT MET'}")
    if warm["lines"] != total:
        raise SystemExit(f"warm run saw {warm['lines']} lines, expected {total}")


if __name__ == "__main__":
    main()
