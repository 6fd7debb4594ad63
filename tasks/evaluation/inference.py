"""Batched classification of log templates by the base model, or the base model plus a LoRA adapter.

One front (`open_engine(...).classify(...)`) over two engines, so evaluation, benchmarks and the registry's
pyfunc model run the exact prompt that training used (tasks.common.prompt + the tokenizer's chat template):

- `vllm`: vLLM's offline engine, in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: a spawned engine core
  would re-import the caller's __main__, which breaks under pytest, Prefect and `python -m`). A LoRA adapter
  is merged into a bf16 copy of the base weights first: on CPU, vLLM's LoRA kernels (punica) were ~30x slower
  than the plain model in our measurement, and merging changes nothing in the maths.
- `transformers`: `generate`, greedy, left-padded batches sorted by length, adapter merged (merge_and_unload).

Both stop at `</answer>` (the end of the answer format) so no time goes into text nobody reads.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tasks.common.config import resolve_threads
from tasks.common.errors import InputError
from tasks.common.prompt import (
    FIRST_STAGE_SCORE,
    TOP_LOGPROBS,
    first_stage_normal,
    parse_completion,
    prompt_messages,
    scoring_messages,
    token_logprobs,
    verdict_score,
)
from tasks.common.tokenizers import special_tokens_of
from tasks.evaluation.memo import AnswerMemo, weights_digest

log = logging.getLogger(__name__)

ENGINES = ("auto", "vllm", "transformers")
_T = TypeVar("_T")
NeighbourLists = Sequence[Sequence[tuple[str, int]]] | None  # per template: (template, label) shown with it
STOP = "</answer>"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class Prediction:
    """One template's answer: the raw completion and what tasks.common.prompt reads in it."""

    template: str
    dataset: str
    completion: str
    verdict: str | None  # 'normal' | 'abnormal' | None when the completion is not format-valid
    label: int  # 1 = abnormal; an unparseable answer counts as normal (0)
    valid: bool
    rationale: str
    rationale_words: int


@dataclass
class InferenceRun:
    """Predictions of one model over a list of templates, with the engine that ran and how fast."""

    predictions: list[Prediction]
    engine: str
    model: str  # 'base' or the adapter folder
    seconds: float  # generation wall time (model loading excluded)
    load_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def templates_per_s(self) -> float:
        """Templates classified per second of generation (0 when no time was measured)."""
        return len(self.predictions) / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """Engine, model, counts and timings as plain data."""
        return {"engine": self.engine, "model": self.model, "templates": len(self.predictions),
                "seconds": round(self.seconds, 2), "load_seconds": round(self.load_seconds, 2),
                "templates_per_s": round(self.templates_per_s, 3), "notes": self.notes}


@dataclass
class ScoreRun:
    """Verdict scores in [0, 1] (None: no answer word among the top tokens) and the seconds they took."""

    scores: list[float | None]
    engine: str
    seconds: float
    model_calls: int | None = None  # templates the model scored (the rest: the first stage); None: all of them


def to_prediction(template: str, dataset: str, completion: str | None) -> Prediction:
    """Read a completion with tasks.common.prompt; never raises, whatever the model wrote."""
    text = completion if isinstance(completion, str) else ""
    parsed = parse_completion(text)
    rationale = parsed.think if parsed.valid else ""
    return Prediction(template=template, dataset=dataset, completion=text, verdict=parsed.answer,
                      label=parsed.label, valid=parsed.valid, rationale=rationale,
                      rationale_words=len(rationale.split()))


def cut_at_stop(text: str) -> str:
    """Drop anything after the first `</answer>`, as vLLM's stop string does."""
    index = text.find(STOP)
    return text if index < 0 else text[: index + len(STOP)]


def check_model_dirs(base_model_dir: str | Path, adapter_dir: str | Path | None = None) -> None:
    """Fail before loading anything when a model folder is missing or is not what it claims to be."""
    base = Path(base_model_dir)
    if not (base / "config.json").is_file():
        raise InputError(base, "base model folder has no config.json", hint="run `dvc repro base_model`")
    if adapter_dir is not None:
        adapter = Path(adapter_dir)
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise InputError(adapter, f"not a LoRA adapter folder (no {ADAPTER_CONFIG})",
                             hint="train it first (`dvc repro sft` / `dvc repro grpo`)")


def vllm_available() -> bool:
    """vLLM is importable in this environment (found without importing it)."""
    return importlib.util.find_spec("vllm") is not None


class Engine:
    """Builds the prompts (chat template over tasks.common.prompt messages) and reads the answers;
    subclasses generate."""

    name = "base"

    def __init__(self, base_model_dir: str | Path, *, batch_size: int = 16, max_new_tokens: int = 96,
                 dtype: str = "bfloat16", max_model_len: int = 1024, threads: int | str | None = None) -> None:
        import torch
        from transformers import AutoTokenizer

        check_model_dirs(base_model_dir)
        self.threads = resolve_threads(threads)
        if self.threads:
            torch.set_num_threads(self.threads)
        self.base_model_dir = Path(base_model_dir)
        self.batch_size = max(1, int(batch_size))
        self.max_new_tokens = int(max_new_tokens)
        self.dtype = dtype
        self.max_model_len = int(max_model_len)
        self.notes: list[str] = []  # what a reader of the results should know (e.g. an engine fallback)
        self.memo: AnswerMemo | None = None  # answers to exact prompts asked before (tasks.evaluation.memo)
        self.load_seconds_total = 0.0  # model (re)loading, kept out of templates/s
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.base_model_dir))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.special_tokens = special_tokens_of(self.tokenizer)  # defanged in log text (tasks.prompt)
        # Room for the answer: longer prompts are cut from the left of the log text by sanitize_log's cap.
        self.max_prompt_tokens = max(32, self.max_model_len - self.max_new_tokens)

    def prompt_ids(self, templates: Sequence[str], datasets: Sequence[str],
                   neighbours: NeighbourLists = None, *, scoring: bool = False,
                   verdicts: Sequence[str | None] | None = None) -> list[list[int]]:
        """Token ids of each chat prompt, keeping the end of an over-long prompt. `scoring`: the verdict task with
        the assistant turn opened by `<answer>` (tasks.common.prompt.scoring_messages); else the explain task
        with the generation prompt, given `verdicts[i]` to explain (None: the open question).
        `neighbours[i]`: the labelled templates shown with template i."""
        shown = neighbours if neighbours is not None else [()] * len(templates)
        given = verdicts if verdicts is not None else [None] * len(templates)
        texts = []
        for t, d, near, verdict in zip(templates, datasets, shown, given, strict=True):
            if scoring:
                messages = scoring_messages(t, d, special_tokens=self.special_tokens, neighbours=near)
                texts.append(self.tokenizer.apply_chat_template(messages, continue_final_message=True,
                                                                tokenize=False))
            else:
                messages = prompt_messages(t, d, special_tokens=self.special_tokens, neighbours=near, verdict=verdict)
                texts.append(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        # Keep the end of an over-long prompt: it holds the question and the assistant header.
        return [ids[-self.max_prompt_tokens:] for ids in encoded]

    def generate(self, prompts: list[list[int]], adapter_dir: Path | None) -> list[str]:
        """One completion per prompt (cut after `</answer>`), with the adapter merged when one is given."""
        raise NotImplementedError

    def next_token_logprobs(self, prompts: list[list[int]], adapter_dir: Path | None) -> list[dict[str, float]]:
        """The top-TOP_LOGPROBS next tokens of each prompt: token text → log-probability."""
        raise NotImplementedError

    def score(self, templates: Sequence[str], datasets: Sequence[str], adapter_dir: str | Path | None = None,
              neighbours: NeighbourLists = None, *, first_stage: bool = True) -> ScoreRun:
        """The calibrated verdict score of every template: P(abnormal) against P(normal) of the answer word's
        first token after a prefilled `<answer>` (the verdict task; one forward pass, no generation). A score is
        None when neither word is among the top tokens. `first_stage`: a template the verdict rule's first stage
        calls normal (tasks.common.prompt.first_stage_normal) gets FIRST_STAGE_SCORE without a model call, as on
        the served path; False scores every template (the ablation)."""
        check_model_dirs(self.base_model_dir, adapter_dir)
        adapter = Path(adapter_dir) if adapter_dir is not None else None
        templates, datasets = [str(t) for t in templates], [str(d) for d in datasets]
        asked = [i for i, t in enumerate(templates) if not (first_stage and first_stage_normal(t))]
        shown = [neighbours[i] for i in asked] if neighbours is not None else None
        prompts = self.prompt_ids([templates[i] for i in asked], [datasets[i] for i in asked], shown, scoring=True)
        started = time.perf_counter()
        load_before = self.load_seconds_total
        tops = self._answers("logprobs", prompts, adapter, self.next_token_logprobs) if prompts else []
        seconds = time.perf_counter() - started - (self.load_seconds_total - load_before)
        scores: list[float | None] = [FIRST_STAGE_SCORE] * len(templates)
        for i, top in zip(asked, tops, strict=True):
            scores[i] = verdict_score(top)
        return ScoreRun(scores, self.name, seconds, len(asked))

    def classify(self, templates: Sequence[str], datasets: Sequence[str] | str = "system log",
                 adapter_dir: str | Path | None = None, neighbours: NeighbourLists = None,
                 verdicts: Sequence[str | None] | None = None) -> InferenceRun:
        """Classify every template once (the caller dedupes); completions that break the format count as normal.
        `verdicts[i]`: the verdict template i's rationale is written for (the explain task given its verdict)."""
        if isinstance(datasets, str):
            datasets = [datasets] * len(templates)
        check_model_dirs(self.base_model_dir, adapter_dir)
        adapter = Path(adapter_dir) if adapter_dir is not None else None
        templates = [str(t) for t in templates]
        datasets = [str(d) for d in datasets]
        prompts = self.prompt_ids(templates, datasets, neighbours, verdicts=verdicts)
        started = time.perf_counter()
        load_before = self.load_seconds_total
        completions = self._answers("generate", prompts, adapter, self.generate) if prompts else []
        load = self.load_seconds_total - load_before
        seconds = time.perf_counter() - started - load
        predictions = [to_prediction(t, d, c) for t, d, c in zip(templates, datasets, completions, strict=True)]
        return InferenceRun(predictions, self.name, str(adapter) if adapter else "base", seconds, load,
                            list(self.notes))

    def _answers(self, kind: str, prompts: list[list[int]], adapter: Path | None,
                 ask: Callable[[list[list[int]], Path | None], list[_T]]) -> list[_T]:
        """`ask(prompts, adapter)`, through the answer memo when the engine has one: only prompts it has not
        answered before (same engine, weights, dtype, budget and prompt ids) reach the model."""
        if self.memo is None:
            return ask(prompts, adapter)
        model = {"engine": self.name, "dtype": self.dtype, "base": weights_digest(self.base_model_dir),
                 "adapter": weights_digest(adapter)}
        if kind == "generate":  # the answer budget and where a completion is cut shape it
            model.update(max_new_tokens=self.max_new_tokens, stop=STOP)
        else:  # how many alternatives the verdict score reads
            model["top_logprobs"] = TOP_LOGPROBS
        return self.memo.answers(kind, model, prompts, lambda missing: ask(missing, adapter))

    def memo_note(self) -> str | None:
        """What the memo answered this run, for the report's notes (None without a memo)."""
        if self.memo is None:
            return None
        return (f"answer memo {self.memo.folder}: {self.memo.hits} answers to prompts asked before, "
                f"{self.memo.misses} asked of the model (seconds and templates/s count only those)")

    def close(self) -> None:
        """Free the model memory."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _torch_dtype(name: str) -> Any:
    import torch

    return {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[name]


def load_merged_model(base_model_dir: Path, adapter_dir: Path | None, dtype: str) -> Any:
    """The base model, with the adapter merged into its weights when one is given (one matmul per layer, not three)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=_torch_dtype(dtype))
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return model.eval()


class _StopAtAnswerEnd:
    """Stops a row once its last tokens spell `</answer>` (transformers' own stop_strings cost ~2 s a step here)."""

    def __init__(self, tokenizer: Any, tail_tokens: int = 8) -> None:
        self.tokenizer, self.tail_tokens = tokenizer, tail_tokens

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        tails = self.tokenizer.batch_decode(input_ids[:, -self.tail_tokens:])
        return torch.tensor([STOP in tail for tail in tails], dtype=torch.bool, device=input_ids.device)


class TransformersEngine(Engine):
    """transformers `generate`: greedy, batched, left padding, prompts sorted by length to waste little padding."""

    name = "transformers"

    def __init__(self, base_model_dir: str | Path, **kwargs: Any) -> None:
        super().__init__(base_model_dir, **kwargs)
        self._model: Any = None
        self._model_key: str | None = None

    def _model_for(self, adapter_dir: Path | None) -> Any:
        key = str(adapter_dir) if adapter_dir else "base"
        if key != self._model_key:
            started = time.perf_counter()
            self._model = None
            gc.collect()
            self._model = load_merged_model(self.base_model_dir, adapter_dir, self.dtype)
            self._model_key = key
            self.load_seconds_total += time.perf_counter() - started
        return self._model

    def generate(self, prompts: list[list[int]], adapter_dir: Path | None) -> list[str]:
        import torch
        from rich.progress import Progress
        from transformers import StoppingCriteriaList

        model = self._model_for(adapter_dir)
        stop = StoppingCriteriaList([_StopAtAnswerEnd(self.tokenizer)])
        pad = self.tokenizer.pad_token_id
        out: list[str] = [""] * len(prompts)
        with Progress(transient=True) as progress, torch.inference_mode():
            bar = progress.add_task(f"generate ({self.name})", total=len(prompts))
            for batch, ids, mask in self._left_padded(prompts):
                width = ids.shape[1]
                generated = model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens, do_sample=False,
                    stopping_criteria=stop, pad_token_id=pad,
                    temperature=None, top_p=None, top_k=None,
                )
                texts = self.tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
                for i, text in zip(batch, texts, strict=True):
                    out[i] = cut_at_stop(text)
                progress.advance(bar, len(batch))
        return out

    def _left_padded(self, prompts: list[list[int]]) -> Iterator[tuple[list[int], Any, Any]]:
        """Batches of `batch_size` prompts of similar length, left-padded: (prompt indices, ids, attention mask)."""
        import torch

        pad = self.tokenizer.pad_token_id
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start: start + self.batch_size]
            width = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            yield batch, ids, mask

    def next_token_logprobs(self, prompts: list[list[int]], adapter_dir: Path | None) -> list[dict[str, float]]:
        """One batched forward pass per `batch_size` prompts, logits of the last position only."""
        import torch

        model = self._model_for(adapter_dir)
        out: list[dict[str, float]] = [{} for _ in prompts]
        with torch.inference_mode():
            for batch, ids, mask in self._left_padded(prompts):
                logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1].float()
                top = torch.log_softmax(logits, dim=-1).topk(TOP_LOGPROBS, dim=-1)
                for row, i in enumerate(batch):
                    out[i] = token_logprobs((self.tokenizer.decode([int(t)]), float(lp))
                                            for lp, t in zip(top.values[row], top.indices[row], strict=True))
        return out

    def close(self) -> None:
        self._model = None
        self._model_key = None
        gc.collect()


@contextlib.contextmanager
def _vllm_env(kvcache_gib: float, threads: int | None) -> Iterator[None]:
    """Env vLLM reads at engine start: in-process engine core, a small CPU KV cache, quiet logs, and the torch
    thread count when one is set (else vLLM's own choice: one thread while serving)."""
    wanted = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
              "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(kvcache_gib))),  # vLLM takes whole GiB only
              "VLLM_LOGGING_LEVEL": "WARNING"}
    if threads:
        wanted["OMP_NUM_THREADS"] = str(threads)
    saved = {key: os.environ.get(key) for key in wanted}
    for key, value in wanted.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class VllmEngine(Engine):
    """vLLM's offline engine, one instance per model (base, or base with a merged adapter)."""

    name = "vllm"

    def __init__(self, base_model_dir: str | Path, *, kvcache_gib: float = 1.0, **kwargs: Any) -> None:
        super().__init__(base_model_dir, **kwargs)
        import torch

        self.kvcache_gib = kvcache_gib
        self._threads = torch.get_num_threads()
        self._llm: Any = None
        self._model_key: str | None = None
        self._merged_dir: Path | None = None
        self._llm_for(None)  # start now, so a broken vLLM is found before any work

    def _merge(self, adapter_dir: Path) -> Path:
        """A bf16 folder of base + adapter merged, in a temp dir removed on close."""
        target = Path(tempfile.mkdtemp(prefix="merged-", dir=os.environ.get("RATIONANOMALY_TMP")))
        model = load_merged_model(self.base_model_dir, adapter_dir, self.dtype)
        model.save_pretrained(str(target), safe_serialization=True)
        self.tokenizer.save_pretrained(str(target))
        del model
        gc.collect()
        return target

    def _free(self) -> None:
        import torch

        self._llm = None
        self._model_key = None
        gc.collect()
        torch.set_num_threads(self._threads)  # vLLM lowers torch's thread count process-wide
        if self._merged_dir is not None:
            shutil.rmtree(self._merged_dir, ignore_errors=True)
            self._merged_dir = None

    def _llm_for(self, adapter_dir: Path | None) -> Any:
        key = str(adapter_dir) if adapter_dir else "base"
        if key == self._model_key:
            return self._llm
        started = time.perf_counter()
        self._free()
        model_dir = self.base_model_dir
        if adapter_dir is not None:
            self._merged_dir = model_dir = self._merge(adapter_dir)
        with _vllm_env(self.kvcache_gib, self.threads):
            from vllm import LLM

            self._llm = LLM(model=str(model_dir), tokenizer=str(self.base_model_dir), dtype=self.dtype,
                            enforce_eager=True, max_model_len=self.max_model_len, max_num_seqs=self.batch_size,
                            enable_prefix_caching=True,  # the shared system prompt is computed once
                            seed=0, disable_log_stats=True)
        self._model_key = key
        self.load_seconds_total += time.perf_counter() - started
        return self._llm

    def generate(self, prompts: list[list[int]], adapter_dir: Path | None) -> list[str]:
        from vllm import SamplingParams

        llm = self._llm_for(adapter_dir)
        sampling = SamplingParams(temperature=0.0, max_tokens=self.max_new_tokens, stop=[STOP],
                                  include_stop_str_in_output=True)
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], sampling, use_tqdm=True)
        return [cut_at_stop(o.outputs[0].text if o.outputs else "") for o in outputs]

    def next_token_logprobs(self, prompts: list[list[int]], adapter_dir: Path | None) -> list[dict[str, float]]:
        """vLLM with max_tokens=1 and `logprobs=TOP_LOGPROBS`: the alternatives at the first generated position."""
        from vllm import SamplingParams

        llm = self._llm_for(adapter_dir)
        sampling = SamplingParams(temperature=0.0, max_tokens=1, logprobs=TOP_LOGPROBS)
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], sampling, use_tqdm=False)
        tops = []
        for output in outputs:
            positions = output.outputs[0].logprobs if output.outputs else None
            first = positions[0] if positions else {}
            tops.append(token_logprobs((lp.decoded_token, lp.logprob) for lp in first.values()
                                       if lp.decoded_token is not None))
        return tops

    def close(self) -> None:
        self._free()


def open_engine(base_model_dir: str | Path, engine: str = "auto", *, batch_size: int = 16, max_new_tokens: int = 96,
                dtype: str = "bfloat16", max_model_len: int = 1024, kvcache_gib: float = 1.0,
                threads: int | str | None = None, memo: AnswerMemo | None = None) -> Engine:
    """The engine to classify with. `auto` takes vLLM when it is installed and starts, else transformers.
    `memo`: answers to exact prompts asked before are taken from it (tasks.evaluation.memo).

    With `auto`, a vLLM that fails to start is reported in `engine.notes` (and the log) and transformers runs;
    with `vllm` named explicitly the failure propagates.
    """
    if engine not in ENGINES:
        raise InputError("params.yaml", f"engine {engine!r} is not one of {ENGINES}", field="evaluate.engine")
    check_model_dirs(base_model_dir)
    common = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "dtype": dtype,
              "max_model_len": max_model_len, "threads": threads}
    note = None
    if engine == "vllm" or (engine == "auto" and vllm_available()):
        try:
            started = VllmEngine(base_model_dir, kvcache_gib=kvcache_gib, **common)
            started.memo = memo
            return started
        except Exception as exc:
            if engine == "vllm":
                raise
            note = f"vLLM failed to start, fell back to transformers: {type(exc).__name__}: {exc}"
            log.warning(note)
    elif engine == "auto":
        note = "vLLM is not installed; transformers generate ran"
    result = TransformersEngine(base_model_dir, **common)
    result.memo = memo
    if note:
        result.notes.append(note)
    return result
