"""The model side of training: base model checks, LoRA configuration, seeding, threads, dtype, digests."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

from tasks.base_model import META_FILE, read_base_model_meta
from tasks.common.adapters import tied_embedding_targets
from tasks.common.config import PARAMS_FILE, resolve_path
from tasks.common.errors import InputError
from tasks.common.settings import LoraSettings


def require_base_model(path: str | Path, field_name: str) -> Path:
    """The base model folder, or an InputError naming the params field that points to it."""
    path = resolve_path(path)
    if not (path / "config.json").is_file():
        problem = "base model folder does not exist" if not path.exists() else "no config.json in the base model folder"
        raise InputError(path, problem, field=field_name, hint="run `dvc repro base_model` or fix the path")
    return path

def base_model_sha256(model_dir: Path) -> str | None:
    """The weights digest recorded by the base_model stage (None for a folder made elsewhere)."""
    if not (model_dir / META_FILE).exists():
        return None
    return read_base_model_meta(model_dir).get("weights_sha256")

def linear_module_names(model: Any) -> list[str]:
    """Short names (last path part) of the linear layers LoRA can target, e.g. q_proj, down_proj."""
    import torch

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)

def lora_config(lora: LoraSettings, model: Any, field_prefix: str) -> Any:
    """A peft LoraConfig from the settings, after checking every target module exists in `model` and can be served.

    peft would otherwise fail late, or (with a partial match) adapt fewer layers than asked; a run that
    adapts nothing would train the plain base model. Never that: a missing name is an InputError. So is
    `embed_tokens` or `lm_head` on a model with tied embeddings (tasks.common.adapters: merged for
    evaluation and serving, such a LoRA changes both sides of the shared matrix).
    """
    from peft import LoraConfig

    targets: list[str] | str = lora.target_modules
    available = linear_module_names(model)
    if targets != "all-linear":
        if isinstance(targets, str):
            targets = [targets]
        all_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in all_names]
        if missing or not targets:
            raise InputError(
                PARAMS_FILE,
                f"LoRA target modules {missing or targets} do not exist in {type(model).__name__}",
                field=f"{field_prefix}.lora.target_modules",
                hint=f"linear modules available: {', '.join(available)}",
            )
        tied = tied_embedding_targets(targets, bool(getattr(model.config, "tie_word_embeddings", False)))
        if tied:
            raise InputError(
                PARAMS_FILE,
                f"LoRA target modules {tied} cannot be served: {type(model).__name__} ties its input and output "
                "embeddings (tie_word_embeddings), and merging such a LoRA changes both",
                field=f"{field_prefix}.lora.target_modules",
                hint="drop them; the attention and MLP projections are the usual targets",
            )
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )

def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())

def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs from one seed (the Trainer reseeds its own from the same value)."""
    import numpy as np
    import torch

    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

OMP_WAIT_POLICY = "PASSIVE"  # what set_torch_threads gives OpenMP when the environment names no policy


def set_torch_threads(setting: int | str | None) -> int:
    """Set torch's intra-op threads from a `torch_threads` setting and return the count: an int, "cores" or
    "auto" as `tasks.common.config.resolve_threads` says; None = one per available core.

    Call it before anything imports torch: it first sets OMP_WAIT_POLICY=PASSIVE (unless the environment names a
    policy), which OpenMP reads once, when torch loads it. A passive thread sleeps at a barrier instead of
    spinning, so it does not hold a core its descheduled sibling needs. Measured on this shared 2-core machine
    (bench/threads.py, issue 22): two spinning threads took 19-69 s per SFT step against 10-19 s passive while other
    jobs ran, 50-94 s against 15-20 s under one busy background core. The price is in decoding (GRPO's rollouts):
    the base model generating 64 tokens for 8 prompts (a one-off check) gave 123 tok/s passive on a near-quiet
    machine against 161 spinning (0.77x), but 98 against 10-48 with a busy core (one thread: 112 and 108).
    Called once torch is loaded, the policy is whatever the process started with, and a RuntimeWarning says so
    when that is OpenMP's spinning default.
    """
    import sys

    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    elif "OMP_WAIT_POLICY" not in os.environ:
        import warnings

        warnings.warn("torch was loaded before the thread rule: its idle OpenMP threads spin (set OMP_WAIT_POLICY="
                      f"{OMP_WAIT_POLICY} before starting the process)", RuntimeWarning, stacklevel=2)
    import torch

    from tasks.common.config import available_cores, resolve_threads

    threads = resolve_threads(setting) or available_cores()
    torch.set_num_threads(threads)
    return threads

def has_accelerator() -> bool:
    """A CUDA/XPU/MPS device is present (else Trainer must be told use_cpu, or bf16 is refused)."""
    import torch

    return (
        torch.cuda.is_available()
        or (hasattr(torch, "xpu") and torch.xpu.is_available())
        or torch.backends.mps.is_available()
    )

def torch_dtype(bf16: bool) -> Any:
    """torch.bfloat16 when the `bf16` setting is on, else torch.float32."""
    import torch

    return torch.bfloat16 if bf16 else torch.float32

def adapter_digest(adapter_dir: str | Path) -> str:
    """sha256 over the adapter's tensors (names and bytes), independent of file metadata."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].float().numpy().tobytes())
    return digest.hexdigest()

def library_versions() -> dict[str, str]:
    """The training libraries' versions, recorded in training_meta.json."""
    import peft
    import torch
    import transformers
    import trl

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
    }
