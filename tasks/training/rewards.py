"""GRPO rewards: one pure function per component, weighted from params.yaml `grpo.rewards`.

Each `*_reward` function follows trl's reward_funcs contract (trl 1.16 `GRPOTrainer._calculate_rewards`):
called with `prompts=`, `completions=` (conversational: one `[{"role": "assistant", "content": ...}]` per
completion), `completion_ids=`, every other dataset column as a keyword list (`label`, `template`,
`rationale`, ...), plus `trainer_state`, `log_extra` and `log_metric`. Each returns one float per completion.
trl sums them with `GRPOConfig.reward_weights` (built by `reward_weights`) and logs every component's mean.

The completion format is owned by `tasks.common.prompt.parse_completion` (tags once each, in order, verdict
`normal|abnormal` after strip+lowercase, non-empty think); nothing here re-parses it.

Why the default values (params.yaml `grpo.rewards`; p = 0.15 is the training anomaly rate of `split`):
- answer table: caught anomaly +2, correct normal +1, false alarm -2, missed anomaly -1/0.15 = -6.67.
  The released code scores both errors -1/0.15 so that, at p = 0.15, answering "normal" to everything
  earns (1-p)·1 + p·(-6.67) = -0.15 < 0. We keep that cost for the missed anomaly (the costliest mistake:
  an unseen failure) but charge a false alarm only -2 (an unneeded page): "always abnormal" then earns
  p·2 + (1-p)·(-2) = -1.4 < 0 too, so neither trivial policy pays, while a caught anomaly earns twice a
  correct normal (recall matters most). The table is asymmetric across prompts, so grpo uses
  `scale_rewards: batch`: per-group std scaling (trl's default) would divide the asymmetry away.
- format: +1 when valid, -7 when not. A format failure zeroes every other component, so an invalid
  completion must score below the worst valid one (1 - 6.67 = -5.67); otherwise breaking the format would
  be a way to dodge the missed-anomaly penalty.
- think (weight 0.5, as the released code's `0.5 * think`) counts only when the format is valid and the
  answer right; it splits into faithfulness 0.7, brevity 0.3, coherence 0, each in [0, 1], so a good
  rationale adds at most 0.5: it shapes how the model explains, never outweighs a right answer.
- faithfulness (issue 19 item 4: GRPO optimises what the evaluate stage measures and the gate checks): the mean of
  the five checks of tasks.evaluation.rationales.check_rationale, one fifth each: agrees (the rationale concludes
  the verdict it was asked to explain: the `label` of the row), component_in_log, quotes_grounded (in the log or a
  neighbour shown in the prompt, the row's `neighbours`), cited_neighbour_shown, and no false "no failure word"
  claim. It replaces the released code's BLEU/ROUGE grounding, which rewarded word overlap with the log and the
  teacher's rationale: no user reads overlap, and the issue-19 rationales that overlapped the log well still
  argued "normal" under an abnormal verdict and said "without any failure word" of a log saying `failed`.
- brevity stays (0.3): 1 - 2|n - m|/(n + m), clipped at 0, with n, m the word counts of the rationale and the
  reference: 1 at the reference's length, 0 at three times (or a third of) it. The checks pass vacuously on a
  rationale that names, quotes and cites nothing ("so the log is abnormal" scores faithfulness 1), so without
  a length term the policy could earn the whole think reward by saying nothing; and long rationales cost latency
  at serving. The released code rewarded longer-than-reference rationales; we reward closeness.
- coherence goes to 0 by default (the code and knob stay for ablations and the gpu profile): 1 - ln(ppl)/
  ln(coherence_max_ppl), clipped to [0, 1], with the perplexity of the rationale under a small frozen LM. It is
  measured nowhere in evaluation and guards against word salad, which the KL term to the SFT adapter (`beta`)
  already keeps away; at weight 0 the LM is neither loaded nor run (it was a second copy of the base model in
  float32 and a forward pass per step on the 2-core budget). Measured with SmolLM2-135M: a teacher-style BGL
  rationale has ppl ~180 (score ~0.39), an unrelated English sentence ~530 (~0.26), the same rationale's words
  shuffled ~2900 (~0.06); hence coherence_max_ppl = 5000.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

from tasks.common.prompt import (
    ABNORMAL,
    EXPLAIN,
    LABELS,
    NORMAL,
    VERDICT,
    Parsed,
    label_name,
    parse_completion,
    parse_verdict,
)
from tasks.common.settings import RewardSettings
from tasks.evaluation.rationales import check_rationale

THINK_COMPONENTS = ("faithfulness", "coherence", "brevity")  # the rationale's parts, each in [0, 1]
COMPONENTS = ("format", "answer", *THINK_COMPONENTS)


# ---- one completion -------------------------------------------------------------------------------------------


def completion_text(completion: str | Sequence[dict[str, str]]) -> str:
    """The text of a completion, whether trl passes it as a string or as chat messages."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if m.get("role", "assistant") == "assistant")


def think_counts(parsed: Parsed, label: int | str) -> bool:
    """The rationale is scored only when the format is valid and the verdict right (as in the released code);
    a verdict-task completion has no rationale to score."""
    return parsed.valid and bool(parsed.think) and parsed.answer == label_name(label)


def format_score(parsed: Parsed, cfg: RewardSettings) -> float:
    """`format_valid` for a completion in the answer format, else `format_invalid` (params.yaml grpo.rewards)."""
    return cfg.format_valid if parsed.valid else cfg.format_invalid


def answer_score(parsed: Parsed, label: int | str, cfg: RewardSettings) -> float:
    """Asymmetric verdict reward; 0 for an invalid completion (its format penalty already says it all)."""
    if not parsed.valid:
        return 0.0
    truth = label_name(label)
    if truth == ABNORMAL:
        return cfg.answer_true_abnormal if parsed.answer == ABNORMAL else cfg.answer_missed_abnormal
    return cfg.answer_true_normal if parsed.answer == NORMAL else cfg.answer_false_abnormal


def faithfulness_score(rationale: str, log: str, dataset: str, neighbours: Sequence[Any],
                       verdict: int | str) -> float:
    """Mean of the five checks of tasks.evaluation.rationales.check_rationale, in [0, 1]: the rationale concludes
    `verdict`, names a component that occurs in the log, quotes only words of the log or a shown neighbour, cites
    only shown neighbours (with their labels), and makes no false "no failure word" claim. `neighbours`: the
    (template, 0/1 label) pairs shown in the prompt; 0.0 for an empty rationale."""
    if not rationale.strip():
        return 0.0
    c = check_rationale(rationale, log, dataset, neighbours, verdict)
    passed = (c.agrees, c.component_in_log, c.quotes_grounded, c.cited_neighbour_shown, not c.false_no_failure_word)
    return sum(passed) / len(passed)


def shown_pairs(neighbours: Any) -> list[tuple[str, int | str]]:
    """A row's `neighbours` column as (template, label) pairs, whether stored as [template, label] lists (the
    distilled jsonl) or {"template", "label"} records (the GRPO dataset: Arrow wants one type per field)."""
    pairs = []
    for n in neighbours or []:
        pairs.append((str(n["template"]), n["label"]) if isinstance(n, dict) else (str(n[0]), n[1]))
    return pairs


def brevity_score(rationale: str, reference: str | None) -> float:
    """1 at the reference rationale's word count, falling linearly to 0 at 3x (or 1/3x) of it."""
    n, m = len(rationale.split()), len((reference or "").split())
    if n == 0:
        return 0.0
    if m == 0:
        return 1.0
    return max(0.0, 1.0 - 2.0 * abs(n - m) / (n + m))


def coherence_score(perplexity: float, max_ppl: float) -> float:
    """Perplexity mapped to [0, 1] on a log scale: 1 at ppl 1, 0 at `max_ppl` and above."""
    if not math.isfinite(perplexity) or perplexity <= 0:
        return 0.0
    return float(min(1.0, max(0.0, 1.0 - math.log(max(perplexity, 1.0)) / math.log(max_ppl))))


# ---- the frozen LM behind coherence ---------------------------------------------------------------------------


class PerplexityScorer:
    """Perplexity of texts under a frozen causal LM, loaded once and run in batches without gradients."""

    def __init__(self, model_dir: str | Path, batch_size: int = 16, max_length: int = 256) -> None:
        self.model_dir, self.batch_size, self.max_length = str(model_dir), batch_size, max_length
        self.model: Any = None  # loaded at the first call: at coherence weight 0 it never is

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        self.model.eval().requires_grad_(False)

    def __call__(self, texts: Sequence[str]) -> list[float]:
        if self.model is None:
            self._load()
        torch = self.torch
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
            with torch.no_grad():
                logits = self.model(**enc).logits[:, :-1].float()
            targets, mask = enc["input_ids"][:, 1:], enc["attention_mask"][:, 1:].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * mask
            counts = mask.sum(dim=1)
            for total, count in zip(nll.sum(dim=1).tolist(), counts.tolist(), strict=True):
                out.append(math.exp(total / count) if count > 0 else math.inf)
        return out


@lru_cache(maxsize=2)
def perplexity_scorer(model_dir: str, batch_size: int = 16) -> PerplexityScorer:
    """One scorer per model folder per process: the LM is loaded once, however many steps call it."""
    return PerplexityScorer(model_dir, batch_size=batch_size)


# ---- trl reward functions (batched, one float per completion) -------------------------------------------------


def parse_for_task(text: str, task: str) -> Parsed:
    """A completion read by its task's format: `explain` think then answer, `verdict` the answer alone."""
    if task == VERDICT:
        answer = parse_verdict(text)
        return Parsed(answer is not None, "", answer)
    return parse_completion(text)


def _parsed(completions: Sequence[Any], task: Sequence[str] | None = None) -> list[Parsed]:
    tasks = task if task is not None else [EXPLAIN] * len(completions)
    return [parse_for_task(completion_text(c), t) for c, t in zip(completions, tasks, strict=True)]


def format_reward(
    completions: Sequence[Any], *, cfg: RewardSettings, log_metric: Callable | None = None,
    task: Sequence[str] | None = None, **_: Any
) -> list[float]:
    """trl reward function: the format score of each completion (in its task's format)."""
    parsed = _parsed(completions, task)
    if log_metric is not None:
        log_metric("format_valid_rate", sum(p.valid for p in parsed) / max(1, len(parsed)))
    return [format_score(p, cfg) for p in parsed]


def answer_reward(
    completions: Sequence[Any],
    label: Sequence[int | str],
    *,
    cfg: RewardSettings,
    log_metric: Callable | None = None,
    task: Sequence[str] | None = None,
    **_: Any,
) -> list[float]:
    """Asymmetric verdict reward, the same table for both tasks (so RL optimises the scored verdict the gate
    measures); also logs its mean per true class (`rewards/answer/<class>`)."""
    scores = [answer_score(p, y, cfg) for p, y in zip(_parsed(completions, task), label, strict=True)]
    if log_metric is not None:
        for cls in LABELS:
            values = [s for s, y in zip(scores, label, strict=True) if label_name(y) == cls]
            if values:
                log_metric(f"rewards/answer/{cls}", sum(values) / len(values))
    return scores


def faithfulness_reward(
    completions: Sequence[Any],
    label: Sequence[int | str],
    template: Sequence[str],
    dataset: Sequence[str] | None = None,
    neighbours: Sequence[Any] | None = None,
    task: Sequence[str] | None = None,
    **_: Any,
) -> list[float]:
    """trl reward function: `faithfulness_score` of each rationale against its log (`template`), the neighbours its
    prompt showed and the verdict it explains (`label`: the expert label the explain prompt states); 0 unless the
    format is valid and the answer right."""
    datasets = dataset if dataset is not None else [""] * len(completions)
    shown = neighbours if neighbours is not None else [[]] * len(completions)
    return [
        faithfulness_score(p.think, log, d, shown_pairs(near), y) if think_counts(p, y) else 0.0
        for p, y, log, d, near in zip(_parsed(completions, task), label, template, datasets, shown, strict=True)
    ]


def brevity_reward(
    completions: Sequence[Any], label: Sequence[int | str], rationale: Sequence[str] | None = None,
    task: Sequence[str] | None = None, **_: Any
) -> list[float]:
    """trl reward function: closeness of each rationale's length to the reference's, 0 unless the answer is right."""
    references = rationale if rationale is not None else [None] * len(completions)
    return [
        brevity_score(p.think, ref) if think_counts(p, y) else 0.0
        for p, y, ref in zip(_parsed(completions, task), label, references, strict=True)
    ]


def coherence_reward(
    completions: Sequence[Any],
    label: Sequence[int | str],
    *,
    cfg: RewardSettings,
    perplexity: Callable[[Sequence[str]], list[float]],
    task: Sequence[str] | None = None,
    **_: Any,
) -> list[float]:
    """Perplexity-based fluency of the rationale; the LM runs only on completions that pass the gate, and not at
    all at `coherence_weight` 0 (every score 0)."""
    parsed = _parsed(completions, task)
    out = [0.0] * len(parsed)
    if cfg.coherence_weight == 0:
        return out
    scored = [i for i, (p, y) in enumerate(zip(parsed, label, strict=True)) if think_counts(p, y)]
    if scored:
        for i, ppl in zip(scored, perplexity([parsed[i].think for i in scored]), strict=True):
            out[i] = coherence_score(ppl, cfg.coherence_max_ppl)
    return out


def reward_functions(cfg: RewardSettings, perplexity: Callable[[Sequence[str]], list[float]]) -> list[Callable]:
    """The five components in COMPONENTS order, bound to their config (trl names them after the function)."""
    return [
        partial(format_reward, cfg=cfg),
        partial(answer_reward, cfg=cfg),
        faithfulness_reward,
        partial(coherence_reward, cfg=cfg, perplexity=perplexity),
        brevity_reward,
    ]


def reward_weights(cfg: RewardSettings) -> list[float]:
    """trl's `reward_weights`, same order as `reward_functions`: the think parts carry think × their share."""
    return [
        cfg.format,
        cfg.answer,
        cfg.think * cfg.faithfulness_weight,
        cfg.think * cfg.coherence_weight,
        cfg.think * cfg.brevity_weight,
    ]


def metric_name(component: str) -> str:
    """The key under which trl logs a component's per-step mean."""
    return f"rewards/{component}_reward/mean"


def total_reward(
    completion: str,
    label: int | str,
    log: str,
    reference: str | None,
    cfg: RewardSettings,
    perplexity: Callable[[Sequence[str]], list[float]],
    dataset: str = "",
    neighbours: Sequence[Any] = (),
) -> dict[str, float]:
    """Every component and the weighted total for one completion (for tests, evaluation and debugging);
    `neighbours` are the (template, label) pairs its prompt showed."""
    kwargs = {"completions": [completion], "label": [label], "template": [log], "rationale": [reference],
              "dataset": [dataset], "neighbours": [list(neighbours)]}
    values = [fn(**kwargs)[0] for fn in reward_functions(cfg, perplexity)]
    scores = dict(zip(COMPONENTS, values, strict=True))
    scores["total"] = sum(w * v for w, v in zip(reward_weights(cfg), values, strict=True))
    return scores
