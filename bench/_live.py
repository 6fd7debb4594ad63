"""Shared by the serving benchmarks: a live vLLM endpoint (the project's, or a temporary one with the tiny adapter).

Not a benchmark itself: running it does nothing.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def base_model_dir() -> Path:
    for candidate in (ROOT / "models" / "base", ROOT / ".cache" / "test-assets" / "base"):
        if (candidate / "config.json").is_file():
            return candidate
    from tasks.base_model import GGUF_SOURCE, build_base_model

    target = ROOT / ".cache" / "test-assets" / "base"
    build_base_model(GGUF_SOURCE, target)
    return target


def mirror() -> Path:
    return Path(os.environ.get("RATIONANOMALY_MIRROR", ROOT.parent / "shared" / "data"))


@contextmanager
def live_server(port: int = 8875, **overrides: Any) -> Iterator[dict[str, Any]]:
    """The project's live server when one is healthy (and no serve params are overridden); else deploy the tiny
    adapter on `port` with the overrides and stop it afterwards."""
    from serving import server
    from serving.resolve import ModelRef
    from serving.tiny_adapter import cached_tiny_adapter
    from tasks.common.settings import load_settings

    params = load_settings(ROOT / "params.yaml").serve
    params = params.model_copy(update={"state_file": str(ROOT / params.state_file)})
    current = server.status(params)
    if current.get("healthy") and not overrides:
        print(f"using the live server: {current['model']} v{current['version']} at {current['url']}")
        yield current
        return
    base = base_model_dir()
    adapter = cached_tiny_adapter(base, ROOT / ".cache" / "test-assets")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
        params = params.model_copy(update={"state_file": f"{folder}/state.json", "log_dir": f"{folder}/logs",
                                           "merged_dir": f"{folder}/merged", "port": port,
                                           "smoke_min_valid_rate": 0.5, **overrides})
        print(f"starting a temporary vLLM server (base + tiny demo adapter) on port {port}…", flush=True)
        state = server.deploy(ModelRef("rationanomaly", "bench", str(base), str(adapter)), params)
        try:
            yield {**state, "state_file": params.state_file, "url": f"http://{state['host']}:{port}/v1"}
        finally:
            server.stop(params)


if __name__ == "__main__":
    pass
