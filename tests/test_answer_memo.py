"""The answer memo (tasks/evaluation/memo.py): an exact prompt asked before of the same engine and weights is not
asked again; anything that could change the answer asks again."""

from __future__ import annotations

import shutil
from pathlib import Path

from tasks.evaluation.inference import Engine
from tasks.evaluation.memo import AnswerMemo, weights_digest


def model_folder(path: Path, weights: bytes) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(weights)
    (path / "adapter_config.json").write_text('{"r": 8}')
    return path


class CountingEngine(Engine):
    """An Engine without a model: its answer is the prompt's length, and every prompt it is asked is recorded."""

    def __init__(self, base: Path, memo: AnswerMemo | None, name: str = "transformers") -> None:  # no tokenizer
        self.name, self.dtype, self.max_new_tokens, self.base_model_dir, self.memo = name, "bfloat16", 8, base, memo
        self.asked: list[list[int]] = []

    def generate(self, prompts: list[list[int]], adapter_dir: Path | None) -> list[str]:
        self.asked += prompts
        return [f"<answer>{len(p)}</answer>" for p in prompts]


def test_a_prompt_asked_before_is_answered_from_the_memo_in_order(tmp_path: Path) -> None:
    base = model_folder(tmp_path / "base", b"base weights")
    adapter = model_folder(tmp_path / "adapter", b"adapter weights")
    engine = CountingEngine(base, AnswerMemo(tmp_path / "memo"))
    first = engine._answers("generate", [[1, 2], [3]], adapter, engine.generate)
    again = engine._answers("generate", [[3], [4, 5, 6], [1, 2]], adapter, engine.generate)
    assert first == ["<answer>2</answer>", "<answer>1</answer>"]
    assert again == ["<answer>1</answer>", "<answer>3</answer>", "<answer>2</answer>"]
    assert engine.asked == [[1, 2], [3], [4, 5, 6]], "only the new prompt reached the model"
    assert (engine.memo.hits, engine.memo.misses) == (2, 3)
    assert "2 answers to prompts asked before, 3 asked of the model" in engine.memo_note()


def test_a_copy_of_the_adapter_hits_and_other_weights_engine_or_budget_miss(tmp_path: Path) -> None:
    """A registered adapter downloaded elsewhere, with a README and calibration beside it, is the same adapter;
    retrained weights, another engine or another answer budget are another question."""
    base = model_folder(tmp_path / "base", b"base weights")
    adapter = model_folder(tmp_path / "adapter", b"adapter weights")
    copy = tmp_path / "download" / "adapter"
    shutil.copytree(adapter, copy)
    (copy / "calibration.json").write_text('{"threshold": 0.3}')
    (copy / "README.md").write_text("model card")
    retrained = model_folder(tmp_path / "retrained", b"other adapter weights")
    assert weights_digest(copy) == weights_digest(adapter) != weights_digest(retrained)
    assert weights_digest(None) == ""

    memo = AnswerMemo(tmp_path / "memo")
    engine = CountingEngine(base, memo)
    engine._answers("generate", [[7, 8]], adapter, engine.generate)
    engine._answers("generate", [[7, 8]], copy, engine.generate)
    assert engine.asked == [[7, 8]]
    engine._answers("generate", [[7, 8]], retrained, engine.generate)
    engine._answers("generate", [[7, 8]], None, engine.generate)  # the base model alone
    engine.max_new_tokens = 16
    engine._answers("generate", [[7, 8]], adapter, engine.generate)
    vllm = CountingEngine(base, memo, name="vllm")
    vllm._answers("generate", [[7, 8]], adapter, vllm.generate)
    assert len(engine.asked) == 4 and vllm.asked == [[7, 8]]


def test_the_memo_survives_the_process_and_an_engine_without_one_always_asks(tmp_path: Path) -> None:
    base = model_folder(tmp_path / "base", b"base weights")
    first = CountingEngine(base, AnswerMemo(tmp_path / "memo"))
    first._answers("generate", [[1]], None, first.generate)
    first.memo.close()
    reopened = CountingEngine(base, AnswerMemo(tmp_path / "memo"))
    assert reopened._answers("generate", [[1]], None, reopened.generate) == ["<answer>1</answer>"]
    assert reopened.asked == []
    bare = CountingEngine(base, None)
    bare._answers("generate", [[1]], None, bare.generate)
    bare._answers("generate", [[1]], None, bare.generate)
    assert bare.asked == [[1], [1]] and bare.memo_note() is None
