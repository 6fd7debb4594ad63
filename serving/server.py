"""vLLM launcher with a blue/green switch: a new model only replaces the live one after health and smoke checks pass.

Order (deploy): verify the registered bytes against the version's lineage (DVC issues 5978, 9641: bytes changed
in place pass `dvc status`) → validate the adapter files → start `python -m vllm.entrypoints.openai.api_server` on the
port the live server is not using → wait for /health → smoke test (every answer format-valid, and the
adapter moves the next-token distribution away from the base model's: vllm issue 55193, a mismatched adapter
silently serves the base) →
write the state file → stop the previous server. Any failure stops the new server only; the old one
keeps serving and ServeError carries the reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from serving.client import Client, Endpoint, EndpointError
from serving.resolve import ADAPTER_CONFIG, ModelRef
from serving.smoke import SMOKE_TEMPLATES
from tasks.common.adapters import (
    MERGE_HINT,
    lora_serving_problems,
    max_lora_rank,
    module_rank,
    tied_embedding_targets,
    vllm_max_lora_rank,
)
from tasks.common.config import resolve_path
from tasks.common.contracts import ServeState
from tasks.common.errors import InputError
from tasks.common.files import atomic_dir, sha256_bytes, write_json_atomic
from tasks.common.settings import ServeSettings
from tasks.common.tokenizers import special_tokens_in

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
BASE_SUFFIX = "-base"
# A LoRA tensor's module, as vLLM's parse_fine_tuned_lora_name reads it (e.g. model.layers.0.self_attn.q_proj)
_LORA_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?:lora_[AB]\.weight|lora_embedding_[AB])$")


class ServeError(RuntimeError):
    """A deploy that did not go live; the previous server (if any) is untouched."""


@dataclass
class SmokeReport:
    """Per-template smoke results and the rule verdicts, kept as data so a person can read why."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    valid_rate: float = 0.0
    min_valid_rate: float = 1.0
    min_shift: float = 0.0
    largest_shift: float | None = None  # largest distribution_shift over the smoke prompts (None: no base served)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when no smoke rule failed."""
        return not self.failures


# ---------------------------------------------------------------- params, paths, state


def state_path(settings: ServeSettings) -> Path:
    """The serve state file (`serve.state_file`, relative to the project folder)."""
    return resolve_path(settings.state_file)


def read_state(settings: ServeSettings) -> ServeState | None:
    """The live server's record, or None when nothing was deployed (or it was stopped).

    Raises InputError naming the state file when it is not valid JSON.
    """
    path = state_path(settings)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, f"state file is not valid JSON: {exc}", hint="delete it and deploy again") from exc


def _pid_alive(pid: int) -> bool:
    """True for a running (not zombie) process; reaps it if it is our own finished child."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _is_our_server(pid: int, port: int) -> bool:
    """Guard against pid reuse: the process must be a vLLM server on `port`."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return SERVER_MODULE.encode() in cmdline and str(port).encode() in cmdline


def _healthy(host: str, port: int, timeout_s: float = 2.0) -> bool:
    try:
        return httpx.get(f"http://{host}:{port}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _terminate(pid: int, timeout_s: float) -> None:
    """SIGTERM the server's process group (vLLM runs an engine child), then SIGKILL after `timeout_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                return
            time.sleep(0.2)


# ---------------------------------------------------------------- checks before the expensive start


def validate_adapter(adapter_dir: str | Path, base_model_dir: str | Path, merged: bool = False) -> dict[str, Any]:
    """Fail in a second, not after a one-minute start: files there, config servable, shapes fit ranks and base.

    Servable: what vLLM's PEFTHelper checks (tasks.common.adapters.lora_serving_problems), except, when
    `merged` (serve.merged), what merging makes servable; and no LoRA on tied embeddings. Each tensor's rank
    is its module's (`r`, or its `rank_pattern` key). Returns {"rank": largest module rank, "tensors": n}.
    Raises InputError naming the file and the field, with `serve.merged: true` as hint where merging works.
    """
    from safetensors import safe_open

    adapter, base = Path(adapter_dir), Path(base_model_dir)
    if not (base / "config.json").exists():
        raise InputError(base, "base model folder has no config.json", hint="run `dvc repro base_model`")
    config_file = adapter / ADAPTER_CONFIG
    if not config_file.exists():
        raise InputError(config_file, "adapter config missing")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(config_file, f"unreadable LoRA config: {exc}") from exc
    if not isinstance(config, dict):
        raise InputError(config_file, f"expected a JSON object, found {type(config).__name__}")
    problems = [p for p in lora_serving_problems(config) if not (merged and p.mergeable)]
    if problems:
        raise InputError(config_file, "; ".join(p.message for p in problems), field=problems[0].field,
                         hint=MERGE_HINT if all(p.mergeable for p in problems) else None)
    rank = int(config["r"])
    weights = adapter / "adapter_model.safetensors"
    if not weights.exists():
        raise InputError(weights, "adapter weights missing")
    base_config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    hidden = base_config.get("hidden_size")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            names = list(handle.keys())
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in names}
    except Exception as exc:  # safetensors raises its own types for truncated or garbled files
        raise InputError(weights, f"adapter weights unreadable ({type(exc).__name__}: {exc})",
                         hint="the file is truncated or corrupt; re-register the adapter") from exc
    if not names:
        raise InputError(weights, "adapter holds no tensors")
    modules = {name: match.group("module") for name in names if (match := _LORA_TENSOR.match(name))}
    tied = tied_embedding_targets([*modules.values(), *(config.get("modules_to_save") or [])],
                                  bool(base_config.get("tie_word_embeddings", False)))
    if tied:
        raise InputError(config_file, f"the adapter changes {tied}, but {base} ties its input and output embeddings "
                         "(tie_word_embeddings: true): served merged or as LoRA it is not the model that was trained "
                         "and evaluated", field="target_modules", hint="retrain without embed_tokens and lm_head")
    for name, shape in shapes.items():
        expected = module_rank(config, modules[name]) if name in modules else rank
        says, field = (f"r={rank}", "r") if expected == rank else (f"rank {expected} (rank_pattern)", "rank_pattern")
        if "lora_A" in name and shape[0] != expected:
            raise InputError(weights, f"tensor {name} has rank {shape[0]}, config says {says}", field=field)
        if "lora_B" in name and shape[-1] != expected:
            raise InputError(weights, f"tensor {name} has rank {shape[-1]}, config says {says}", field=field)
        if "lora_A" in name and hidden and "o_proj" not in name and "down_proj" not in name and shape[1] != hidden:
            raise InputError(weights, f"tensor {name} expects input width {shape[1]}, the base model has {hidden}",
                             hint="the adapter was trained on another base model")
    return {"rank": max_lora_rank(config), "tensors": len(names)}


def verify_artifacts(ref: ModelRef) -> list[str]:
    """The bytes about to be served, checked against what the version's lineage records: every file of its adapter
    and index folders against the manifests in the lineage.json beside them, and the base weights' sha256.

    Returns the names checked; [] for a folder without lineage.json (a local adapter, not a registered version) or
    a version registered before manifests were kept (said on stderr). Raises IntegrityError naming the file.
    """
    from tasks.release.lineage import LINEAGE_FILE, verify_version_files

    folder = Path(str(ref.adapter_dir)).parent
    checked = verify_version_files(
        folder, what=f"{ref.name} v{ref.version}", base_model_dir=Path(ref.base_model_dir),
        hint=f"the downloaded copy is damaged: delete {folder.parent} and deploy again to download it afresh; if it "
             "stays damaged, the registry's copy is: register the candidate again")
    if not checked and (folder / LINEAGE_FILE).is_file():
        print(f"{ref.name} v{ref.version} records no per-file hashes (registered before they were kept): served "
              "unverified", file=sys.stderr)
    return checked


def merge_adapter(ref: ModelRef, out_dir: Path) -> Path:
    """Merged-weights option: base + adapter folded into one folder (cached per version).

    Refuses an adapter that would change nothing (no LoRA layer matched the model, or all-zero B
    matrices): merged, it would silently be the base model.
    """
    if (out_dir / "config.json").exists():
        return out_dir
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(ref.base_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, ref.adapter_dir)
    lora_b = [p for name, p in peft_model.named_parameters() if "lora_B" in name]
    if not lora_b or all(float(p.detach().abs().sum()) == 0.0 for p in lora_b):
        raise ServeError(f"{ref.adapter_dir}: the adapter changes no weight of {ref.base_model_dir} "
                         f"({len(lora_b)} LoRA layers matched); merged it would silently serve the base model")
    merged = peft_model.merge_and_unload()
    with atomic_dir(out_dir) as staging:
        merged.save_pretrained(str(staging), safe_serialization=True)
        AutoTokenizer.from_pretrained(ref.base_model_dir).save_pretrained(str(staging))
    return out_dir


# ---------------------------------------------------------------- smoke test


def distribution_shift(adapter: Mapping[str, float], base: Mapping[str, float]) -> float:
    """Total variation distance (0..1) between two top-k next-token distributions ({token: log-probability}).

    A token missing from one top-k counts as probability 0 there. Measured against the base (2026-11-30): an
    all-zero adapter up to 0.015 (float rounding, largest where the base's distribution is flat, as after
    `<answer>`), the tests' tiny adapter 0.88, the default champion 0.90-0.95 per smoke template (the larger
    of the two positions `_largest_shift` reads).
    """
    tokens = adapter.keys() | base.keys()
    return 0.5 * sum(abs(math.exp(adapter.get(t, -math.inf)) - math.exp(base.get(t, -math.inf))) for t in tokens)


def _largest_shift(client: Client, template: str, dataset: str, base_model: str) -> float | None:
    """The largest `distribution_shift` between adapter and base over the two positions training moves most:
    the first token of the explain answer and the answer word after `<answer>` (the verdict score's position).
    None when the server returned no log-probabilities for a position."""
    endpoint = client.endpoint()
    near = client.neighbours_of(template, endpoint, dataset)
    shifts = []
    for messages, continued in ((client.explain_messages(template, dataset, endpoint, near), False),
                                (client.scoring_messages(template, dataset, endpoint, near), True)):
        adapter = client.next_token_logprobs(messages, continue_final_message=continued)[0]
        base = client.next_token_logprobs(messages, model=base_model, continue_final_message=continued)[0]
        if not adapter or not base:
            return None
        shifts.append(distribution_shift(adapter, base))
    return max(shifts)


def smoke_test(client: Client, base_model: str | None, min_valid_rate: float, max_tokens: int,
               min_shift: float) -> SmokeReport:
    """Every smoke template answered in the trained format (at `min_valid_rate`), and the adapter active.

    When the version has a verdict threshold, an answer counts as valid only if it was also scored (the answer
    token's log-probs came back) and its rationale still ends in an answer word.

    "Active" (vllm issue 55193: a mismatched adapter silently serves the base model) is judged on next-token
    distributions, not on answer texts: the greedy text of an all-zero adapter drifted from the base's at a
    near-tie in CI (concurrent batching changes float rounding), which a text rule takes for an active adapter.
    The rule needs `_largest_shift` >= `min_shift` on at least one smoke template; a server that returns no
    log-probabilities fails it. `base_model` is the base's served name (LoRA serving); None (merged weights)
    skips the rule, which merge_adapter has already enforced on the weights.
    """
    report = SmokeReport(min_valid_rate=min_valid_rate, min_shift=min_shift)
    verdicts = client.classify(list(SMOKE_TEMPLATES), max_tokens=max_tokens)
    missing_logprobs = 0
    for verdict in verdicts:
        shift = None
        if base_model is not None:
            shift = _largest_shift(client, verdict.template, verdict.dataset, base_model)
            missing_logprobs += shift is None
            report.largest_shift = max(report.largest_shift or 0.0, shift or 0.0)
        # With a threshold the verdict is scored; the rationale must still end in a readable answer word.
        valid = verdict.valid and (verdict.score is None or verdict.answer is not None)
        report.rows.append({"dataset": verdict.dataset, "template": verdict.template, "valid": valid,
                            "answer": verdict.verdict, "score": verdict.score,
                            "shift_from_base": None if shift is None else round(shift, 6),
                            "completion": verdict.raw[:300]})
    valid = sum(row["valid"] for row in report.rows)
    report.valid_rate = valid / len(report.rows)
    if report.valid_rate < min_valid_rate:
        bad = [f"[{r['dataset']}] {r['template']!r} → {r['completion'][:80]!r}" for r in report.rows if not r["valid"]]
        report.failures.append(
            f"format-valid rate {report.valid_rate:.2f} < serve.smoke_min_valid_rate {min_valid_rate}; "
            f"invalid answers: {'; '.join(bad)}"
        )
    if missing_logprobs:
        report.failures.append(
            f"the server returned no log-probabilities for {missing_logprobs} of {len(report.rows)} smoke templates, "
            "so the adapter cannot be compared with the base model"
        )
    elif report.largest_shift is not None and report.largest_shift < min_shift:
        report.failures.append(
            f"the adapter leaves the base model's next-token distributions unchanged on every smoke template "
            f"(largest shift {report.largest_shift:.5f} < serve.smoke_min_distribution_shift {min_shift}): "
            "the adapter is not active (mismatched or empty adapter; vllm issue 55193)"
        )
    return report


# ---------------------------------------------------------------- start, deploy, status, stop


def _api_key(settings: ServeSettings) -> str | None:
    return os.environ.get(settings.api_key_env) or None if settings.api_key_env else None


def _choose_port(settings: ServeSettings, live: dict[str, Any] | None) -> int:
    """Blue/green: serve.port and serve.port+1 alternate; the new server takes the one the live server is not on."""
    first = settings.port
    port = first + 1 if live and int(live.get("port", -1)) == first else first
    if not _port_free(settings.host, port):
        raise ServeError(f"port {port} on {settings.host} is in use by another process; "
                         f"free it or change serve.port (the switch uses {first} and {first + 1})")
    return port


def _command(ref: ModelRef, model_dir: str, port: int, settings: ServeSettings, lora: bool) -> list[str]:
    cmd = [sys.executable, "-m", SERVER_MODULE, "--model", model_dir, "--host", settings.host,
           "--port", str(port), "--max-model-len", str(settings.max_model_len), "--dtype", settings.dtype]
    if lora:
        config = json.loads((Path(str(ref.adapter_dir)) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        rank = vllm_max_lora_rank(max_lora_rank(config))  # validate_adapter refused ranks above vLLM's largest
        cmd += ["--served-model-name", ref.name + BASE_SUFFIX, "--enable-lora", "--max-loras", "1",
                "--max-lora-rank", str(rank), "--lora-modules", f"{ref.name}={ref.adapter_dir}"]
    else:
        cmd += ["--served-model-name", ref.name]
    if settings.enforce_eager:
        cmd.append("--enforce-eager")
    return cmd + [str(arg) for arg in settings.extra_args]


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _wait_healthy(proc: subprocess.Popen[bytes], host: str, port: int, timeout_s: float, log: Path) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if proc.poll() is not None:
            raise ServeError(f"vLLM exited with code {proc.returncode} before /health answered; "
                             f"log {log}:\n{_log_tail(log)}")
        if _healthy(host, port):
            return time.monotonic() - started
        time.sleep(1.0)
    raise ServeError(f"/health on port {port} did not answer within serve.health_timeout_s={timeout_s}; "
                     f"log {log}:\n{_log_tail(log)}")


def start_server(ref: ModelRef, settings: ServeSettings, port: int) -> tuple[subprocess.Popen[bytes], Path, str]:
    """Start vLLM detached (its own session, so it outlives this command); returns the process, log and model dir.

    Raises ServeError when merging the adapter (`serve.merged`) fails.
    """
    lora = ref.adapter_dir is not None and not settings.merged
    model_dir = ref.base_model_dir
    if ref.adapter_dir is not None and settings.merged:
        try:
            model_dir = str(merge_adapter(ref, resolve_path(settings.merged_dir) / f"{ref.name}-v{ref.version}"))
        except ServeError:
            raise
        except Exception as exc:  # peft/transformers raise many types for a bad adapter
            raise ServeError(f"merging {ref.adapter_dir} into {ref.base_model_dir} failed: {exc}") from exc
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    log = resolve_path(settings.log_dir) / f"{ref.name}-v{ref.version}-{port}-{stamp}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(settings.kvcache_space_gib), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if settings.cpu_reserved is not None:  # vLLM keeps 1 core for the HTTP front end by default
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(settings.cpu_reserved)
    key = _api_key(settings)
    if key:
        env["VLLM_API_KEY"] = key  # via env, not argv: argv is visible to every local user in `ps`
    with log.open("ab") as handle:
        proc = subprocess.Popen(_command(ref, model_dir, port, settings, lora), stdout=handle, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    return proc, log, model_dir


def deploy(ref: ModelRef, settings: ServeSettings, *, force: bool = False) -> dict[str, Any]:
    """Bring `ref` up beside the live server, check it, switch the state file, stop the old one.

    Returns the new state (with `action`: deployed | already_live; `relaunched_for` lists the
    `launch_settings` keys that changed when the live version was started again). Raises ServeError or
    InputError (old server untouched).
    """
    lock_file = state_path(settings).with_suffix(".lock")
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise ServeError(f"another deploy holds {lock_file}; wait for it to finish") from exc
        return _deploy_locked(ref, settings, force)


def launch_settings(ref: ModelRef, settings: ServeSettings) -> dict[str, Any]:
    """Everything that decides what a server answers and how it runs, recorded in the state file as `launch`.

    A deploy of the live version is a no-op only while these are unchanged: switching `serve.merged`, the
    context length or vLLM's arguments, or a version whose threshold or index moved, starts a new server.
    """
    key = _api_key(settings)
    return {"base": ref.base_model_dir, "adapter": ref.adapter_dir, "threshold": ref.threshold,
            "index_dir": ref.index_dir, "neighbours": ref.neighbours,
            "merged": settings.merged and ref.adapter_dir is not None, "host": settings.host, "port": settings.port,
            "max_model_len": settings.max_model_len, "dtype": settings.dtype, "enforce_eager": settings.enforce_eager,
            "extra_args": [str(arg) for arg in settings.extra_args], "kvcache_space_gib": settings.kvcache_space_gib,
            "cpu_reserved": settings.cpu_reserved, "api_key_env": settings.api_key_env,
            # a new key value must restart the server; only a digest is written to the state file
            "api_key_sha256": sha256_bytes(key.encode())[:16] if key else None}


def _deploy_locked(ref: ModelRef, settings: ServeSettings, force: bool) -> dict[str, Any]:
    live = status(settings)
    launch = launch_settings(ref, settings)
    changed: list[str] = []
    if live.get("healthy") and live.get("model") == ref.name and str(live.get("version")) == str(ref.version):
        before = live.get("launch")
        changed = (["launch (not recorded by the deploy that started it)"] if before is None
                   else sorted(key for key in launch if before.get(key) != launch[key]))
        if not force and not changed:
            return {**live, "action": "already_live"}
    if ref.adapter_dir is not None:
        verify_artifacts(ref)
        validate_adapter(ref.adapter_dir, ref.base_model_dir, merged=settings.merged)
    port = _choose_port(settings, live if live.get("alive") else None)
    proc, log, model_dir = start_server(ref, settings, port)
    try:
        ready_s = _wait_healthy(proc, settings.host, port, settings.health_timeout_s, log)
        lora = ref.adapter_dir is not None and not settings.merged
        special = tuple(special_tokens_in(model_dir))
        endpoint = Endpoint(f"http://{settings.host}:{port}/v1", ref.name, str(ref.version), _api_key(settings),
                            special, ref.threshold, ref.index_dir, ref.neighbours, prompt_format=ref.prompt_format)
        budget = int(settings.smoke_max_tokens)  # type: ignore[arg-type]  # resolved by Settings (evaluate's budget)
        client = Client(endpoint, concurrency=4, max_retries=2, backoff_s=0.5, timeout_s=settings.smoke_timeout_s,
                        max_tokens=budget, max_log_chars=2000, rationales="all")
        try:
            report = smoke_test(client, ref.name + BASE_SUFFIX if lora else None, settings.smoke_min_valid_rate,
                                budget, settings.smoke_min_distribution_shift)
        except EndpointError as exc:
            raise ServeError(f"smoke test got no answers from {ref.name} v{ref.version} on port {port}: {exc}; "
                             f"log {log}:\n{_log_tail(log)}") from exc
        finally:
            client.close()
        if not report.passed:
            raise ServeError(f"smoke test failed for {ref.name} v{ref.version} on port {port}: "
                             + " | ".join(report.failures))
    except BaseException:
        _terminate(proc.pid, settings.stop_timeout_s)
        raise
    state: ServeState = {
        "model": ref.name, "version": str(ref.version), "served_model": ref.name,
        "base_served_model": ref.name + BASE_SUFFIX if lora else None, "host": settings.host, "port": port,
        "pid": proc.pid, "started_at": datetime.now(UTC).isoformat(timespec="seconds"), "ready_s": round(ready_s, 1),
        "base": ref.base_model_dir, "adapter": ref.adapter_dir, "merged": not lora and ref.adapter_dir is not None,
        "model_dir": model_dir, "log": str(log), "api_key_env": settings.api_key_env,
        "special_tokens": list(special),  # defanged in log text by every client
        "threshold": ref.threshold, "index_dir": ref.index_dir, "neighbours": ref.neighbours, "launch": launch,
        "prompt_format": ref.prompt_format,
        "smoke": asdict(report) | {"passed": report.passed},
    }
    write_json_atomic(state_path(settings), state)
    if live.get("alive") and live.get("pid") != proc.pid:
        _terminate(int(live["pid"]), settings.stop_timeout_s)
    return {**state, "action": "deployed", "relaunched_for": changed,
            "previous": {k: live.get(k) for k in ("model", "version", "port", "pid")}}


def status(settings: ServeSettings) -> dict[str, Any]:
    """The state file plus what is true now: is the process alive (`alive`), does /health answer (`healthy`)."""
    state = read_state(settings)
    if state is None:
        return {"alive": False, "healthy": False, "state_file": str(state_path(settings))}
    pid, port = int(state["pid"]), int(state["port"])
    alive = _pid_alive(pid) and _is_our_server(pid, port)
    healthy = alive and _healthy(state["host"], port)
    return {**state, "alive": alive, "healthy": healthy, "url": f"http://{state['host']}:{port}/v1",
            "state_file": str(state_path(settings))}


def stop(settings: ServeSettings) -> dict[str, Any]:
    """Stop the live server and clear the state file; a no-op when nothing runs."""
    current = status(settings)
    if current.get("alive"):
        _terminate(int(current["pid"]), settings.stop_timeout_s)
    path = state_path(settings)
    if path.exists():
        path.unlink()
    return {**current, "stopped": bool(current.get("alive"))}
