"""Adapters vLLM cannot serve are refused in a second, before any server starts, naming the field (issue 15, case 7).

Real small adapter files (safetensors + adapter_config.json) against a base folder's config.json; the rules
are checked against vLLM's own PEFTHelper where vLLM is installed.
"""

from __future__ import annotations

import json
import time
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from serving import server
from serving.resolve import ModelRef
from tasks.common.adapters import VLLM_MAX_LORA_RANKS, lora_serving_problems, vllm_max_lora_rank
from tasks.common.errors import InputError
from tasks.common.settings import LoraSettings, load_settings

REPO = Path(__file__).resolve().parents[1]
HIDDEN = 64
BASE_LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "peft_type": "LORA", "bias": "none"}


def write_adapter(folder: Path, ranks: tuple[int, int] = (8, 8), extra_modules: tuple[str, ...] = (),
                  **config: Any) -> Path:
    """Two layers of q_proj LoRA (layer i has rank ranks[i]) plus LoRA on `extra_modules`, and its config."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer, rank in enumerate(ranks):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, HIDDEN)
        tensors[f"{prefix}.lora_B.weight"] = torch.zeros(HIDDEN, rank)
    for module in extra_modules:
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(ranks[0], HIDDEN)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.zeros(100, ranks[0])
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({**BASE_LORA, **config}))
    return folder


def write_base(folder: Path, tied: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"hidden_size": HIDDEN, "model_type": "llama",
                                                    "tie_word_embeddings": tied}))
    return folder


def refusal(adapter: Path, base: Path, merged: bool = False) -> str:
    started = time.monotonic()
    with pytest.raises(InputError) as failure:
        server.validate_adapter(adapter, base, merged=merged)
    assert time.monotonic() - started < 1.0  # in a second, not after a one-minute vLLM start
    return str(failure.value)


# ---------------------------------------------------------------- what vLLM refuses, refused first


def test_modules_to_save_is_refused_naming_the_field_and_the_merge_option(tmp_path: Path) -> None:
    message = refusal(write_adapter(tmp_path / "a", modules_to_save=["lm_head"]), write_base(tmp_path / "base"))
    assert "adapter_config.json field 'modules_to_save': vLLM serves modules_to_save only for classification" in message
    assert "['lm_head']" in message and "serve.merged: true" in message


def test_dora_is_refused_naming_use_dora(tmp_path: Path) -> None:
    message = refusal(write_adapter(tmp_path / "a", use_dora=True), write_base(tmp_path / "base"))
    assert "field 'use_dora': vLLM does not serve DoRA adapters" in message and "serve.merged: true" in message


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_a_bias_other_than_none_is_refused(tmp_path: Path, bias: str) -> None:
    message = refusal(write_adapter(tmp_path / "a", bias=bias), write_base(tmp_path / "base"))
    assert f"field 'bias': vLLM serves adapters with bias 'none' only, found '{bias}'" in message


def test_a_rank_above_vllms_largest_is_refused_naming_r_not_a_traceback(tmp_path: Path) -> None:
    message = refusal(write_adapter(tmp_path / "a", ranks=(1024, 1024), r=1024), write_base(tmp_path / "base"))
    assert "field 'r': LoRA rank 1024 is above vLLM's largest --max-lora-rank 512" in message
    assert "serve.merged: true" in message


def test_an_init_that_changes_the_base_weights_is_refused_even_merged(tmp_path: Path) -> None:
    message = refusal(write_adapter(tmp_path / "a", init_lora_weights="pissa"), write_base(tmp_path / "base"),
                      merged=True)
    assert "field 'init_lora_weights'" in message and "path_initial_model_for_weight_conversion" in message
    assert "serve.merged" not in message


def test_merged_serving_accepts_what_merging_makes_servable(tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "a", ranks=(1024, 1024), r=1024, use_dora=True, bias="all")
    assert server.validate_adapter(adapter, write_base(tmp_path / "base"), merged=True)["rank"] == 1024


def test_every_problem_is_named_at_once(tmp_path: Path) -> None:
    message = refusal(write_adapter(tmp_path / "a", use_dora=True, bias="all", modules_to_save=["lm_head"]),
                      write_base(tmp_path / "base"))
    assert "field 'modules_to_save'" in message and "DoRA" in message and "bias 'none' only" in message


# ---------------------------------------------------------------- rank_pattern


def test_a_valid_rank_pattern_is_accepted_and_sizes_max_lora_rank(tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "a", ranks=(8, 32), rank_pattern={"model.layers.1.self_attn.q_proj": 32})
    base = write_base(tmp_path / "base")
    assert server.validate_adapter(adapter, base) == {"rank": 32, "tensors": 4}
    params = load_settings(REPO / "params.yaml").serve
    command = server._command(ModelRef("m", "1", str(base), str(adapter)), str(base), 8000, params, lora=True)
    assert command[command.index("--max-lora-rank") + 1] == "32"


def test_a_rank_pattern_the_tensors_disagree_with_is_refused(tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "a", ranks=(8, 8), rank_pattern={"layers.1.self_attn.q_proj": 16})
    message = refusal(adapter, write_base(tmp_path / "base"))
    assert "layers.1.self_attn.q_proj.lora_A.weight has rank 8, config says rank 16 (rank_pattern)" in message
    assert "field 'rank_pattern'" in message


def test_max_lora_rank_is_the_smallest_vllm_accepts() -> None:
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 300, 320, 512, 513)] == [1, 8, 8, 320, 320, 512, None]


# ---------------------------------------------------------------- tied embeddings: training and serving


def test_an_adapter_on_tied_embeddings_is_refused(tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "a", extra_modules=("lm_head",), target_modules=["q_proj", "lm_head"])
    message = refusal(adapter, write_base(tmp_path / "tied", tied=True), merged=True)
    assert "field 'target_modules': the adapter changes ['lm_head']" in message and "tie_word_embeddings" in message
    assert server.validate_adapter(adapter, write_base(tmp_path / "untied"))["tensors"] == 6


def tiny_llama(tied: bool) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied))


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_training_refuses_lora_on_tied_embeddings_before_the_first_step(target: str) -> None:
    from tasks.training.model import lora_config

    lora = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", target])
    with pytest.raises(InputError) as failure:
        lora_config(lora, tiny_llama(tied=True), "sft")
    assert f"field 'sft.lora.target_modules': LoRA target modules ['{target}'] cannot be served" in str(failure.value)
    assert target in lora_config(lora, tiny_llama(tied=False), "sft").target_modules


def test_what_training_saves_is_servable(tmp_path: Path) -> None:
    from peft import get_peft_model

    from tasks.training.model import lora_config

    params = load_settings(REPO / "params.yaml").sft.lora
    model = get_peft_model(tiny_llama(tied=True), lora_config(params, tiny_llama(tied=True), "sft"))
    model.save_pretrained(str(tmp_path / "adapter"))
    model.base_model.model.config.save_pretrained(str(tmp_path / "base"))
    checked = server.validate_adapter(tmp_path / "adapter", tmp_path / "base")
    assert checked == {"rank": params.r, "tensors": 2 * len(params.target_modules)}


@pytest.mark.parametrize(("merged", "field", "config"), [
    (False, "use_dora", {"use_dora": True}),  # the LoRA path cannot serve DoRA (merging could)
    (True, "init_lora_weights", {"init_lora_weights": "pissa"}),  # not even merged
])
def test_deploying_an_unservable_adapter_starts_no_server(tmp_path: Path, merged: bool, field: str,
                                                         config: dict[str, Any]) -> None:
    params = load_settings(REPO / "params.yaml").serve.model_copy(
        update={"state_file": str(tmp_path / "state.json"), "log_dir": str(tmp_path / "logs"), "port": 1,
                "merged": merged, "merged_dir": str(tmp_path / "merged")})
    adapter = write_adapter(tmp_path / "a", **config)
    with pytest.raises(InputError, match=f"field '{field}'"):
        server.deploy(ModelRef("m", "2", str(write_base(tmp_path / "base")), str(adapter)), params)
    assert not any((tmp_path / name).exists() for name in ("logs", "state.json", "merged"))


# ---------------------------------------------------------------- the rules are vLLM's


CONFIGS = [
    BASE_LORA,
    {**BASE_LORA, "modules_to_save": ["lm_head"]},
    {**BASE_LORA, "modules_to_save": ["score"]},
    {**BASE_LORA, "use_dora": True},
    {**BASE_LORA, "bias": "all"},
    {**BASE_LORA, "lora_bias": True},
    {**BASE_LORA, "r": 1024},
    {**BASE_LORA, "r": 512},
    {**BASE_LORA, "r": 0},
    {**BASE_LORA, "rank_pattern": {"q_proj": 32}},
    {**BASE_LORA, "rank_pattern": {"q_proj": 1024}},
    {**BASE_LORA, "rank_pattern": {"q_proj": 0}},
    {**BASE_LORA, "init_lora_weights": "pissa"},
    {**BASE_LORA, "init_lora_weights": "gaussian"},
    {**BASE_LORA, "init_lora_weights": False},
    {**BASE_LORA, "alora_invocation_tokens": [1, 2]},
    {**BASE_LORA, "layer_replication": [[0, 1]]},
    {**BASE_LORA, "use_bdlora": {"block": 2}},
    {**BASE_LORA, "use_qalora": True},
    {**BASE_LORA, "use_rslora": True},
    {"r": 8, "target_modules": ["q_proj"]},
]


@pytest.fixture(scope="module")
def vllm_lora() -> Any:
    helper = pytest.importorskip("vllm.lora.peft_helper")
    lora = pytest.importorskip("vllm.config.lora")
    return helper.PEFTHelper, lora


def test_the_checks_refuse_exactly_what_vllms_peft_helper_refuses(vllm_lora: Any) -> None:
    peft_helper, lora = vllm_lora
    assert typing.get_args(lora.MaxLoRARanks) == VLLM_MAX_LORA_RANKS
    limits = lora.LoRAConfig(max_lora_rank=VLLM_MAX_LORA_RANKS[-1])
    for config in CONFIGS:
        try:
            peft_helper.from_dict(dict(config)).validate_legal(limits)
            vllm_refuses = False
        except ValueError:
            vllm_refuses = True
        assert bool(lora_serving_problems(config)) == vllm_refuses, config
