"""A tiny real LoRA adapter, trained in about a minute, so serving can be exercised without the full pipeline.

Tests and benchmarks need an adapter that (a) loads in vLLM like a released one and (b) answers the
smoke templates in the trained format and differently from the base model. A few dozen steps of
supervised training on the smoke set (serving.smoke) give exactly that; it is not a useful detector.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from serving.smoke import SMOKE_SET
from tasks.common.files import atomic_dir, sha256_json
from tasks.common.prompt import format_completion, prompt_messages
from tasks.common.tokenizers import special_tokens_of


def build_tiny_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    examples: Sequence[tuple[str, str, str, str]] = SMOKE_SET,
    steps: int = 14,
    rank: int = 8,
    learning_rate: float = 5e-3,
    last_layers: int = 10,
    seed: int = 0,
) -> Path:
    """Train a LoRA adapter on `examples` (dataset, template, label, rationale); written to `out_dir` on success.

    Only the last `last_layers` layers get LoRA weights: backward stops there, which halves the step time.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    layers = model.config.num_hidden_layers
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        layers_to_transform=list(range(max(0, layers - last_layers), layers)),
    )
    model = get_peft_model(model, config)

    rows, masks = [], []
    for dataset, template, label, rationale in examples:
        prompt = tokenizer.apply_chat_template(
            prompt_messages(template, dataset, special_tokens=special_tokens_of(tokenizer)), tokenize=False,
            add_generation_prompt=True,
        )
        answer = format_completion(rationale, label) + tokenizer.eos_token
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        rows.append(p_ids + a_ids)
        masks.append([0] * len(p_ids) + [1] * len(a_ids))
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = input_ids.clone()
    labels[torch.tensor([m + [0] * (width - len(m)) for m in masks]) == 0] = -100

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    meta = {"steps": steps, "rank": rank, "seed": seed, "final_loss": round(loss.item(), 4)}
    with atomic_dir(out_dir) as staging:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        (staging / "tiny_adapter.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")
    return out_dir


def cached_tiny_adapter(base_dir: str | Path, cache_root: str | Path) -> Path:
    """The tiny adapter under `cache_root`, keyed by the smoke set, built on first use (about a minute)."""
    key = sha256_json(SMOKE_SET)[:10]
    target = Path(cache_root) / f"tiny-adapter-{key}"
    if not (target / "adapter_model.safetensors").exists():
        build_tiny_adapter(base_dir, target)
    return target
