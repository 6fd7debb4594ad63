"""The SFT/GRPO training records: read and checked from the distilled jsonl, balanced, logged as a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.common.errors import InputError
from tasks.common.files import iter_json_lines, md5_file
from tasks.common.prompt import EXPLAIN, TASKS, label_id, parse_completion, parse_verdict

ROLES = ("system", "user", "assistant")
DATASET_NAME = "sft-cot"  # the MLflow dataset name flows/data.py gives data/sft/train.jsonl


def _check_message(msg: Any, role: str, path: Path, line: int, where: str) -> str:
    if not isinstance(msg, dict):
        raise InputError(path, f"expected a message object, found {type(msg).__name__}", line=line, field=where)
    if msg.get("role") != role:
        raise InputError(
            path,
            f"expected role '{role}', found {msg.get('role')!r}",
            line=line,
            field=f"{where}.role",
            hint="each example is [system, user, assistant]",
        )
    content = msg.get("content")
    if not isinstance(content, str) or not content.strip():
        raise InputError(path, "message content is missing or empty", line=line, field=f"{where}.content")
    return content

def load_sft_records(path: str | Path) -> list[dict[str, Any]]:
    """Read and check the SFT jsonl; every problem names the file, the line and the field.

    Raises InputError naming the file, line and field for a missing file, bad JSON, a wrong message list,
    an assistant turn that breaks the answer format, or a label that disagrees with it.
    Returns one normalised record per line: prompt ([system, user]), completion ([assistant]),
    template (the log text), dataset, label (0/1), rationale (the reference think part), task (`explain`,
    the default, or `verdict`, whose completion is the answer alone) and neighbours (the (template, 0/1 label)
    pairs the prompt shows; GRPO's faithfulness reward checks citations and quotes against them).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "SFT dataset not found", hint="run `dvc repro distill` or set data_file in params.yaml")
    records: list[dict[str, Any]] = []
    for line_no, row in iter_json_lines(path):
        if not isinstance(row, dict):
            raise InputError(path, f"expected a JSON object, found {type(row).__name__}", line=line_no)
        messages = row.get("messages")
        if not isinstance(messages, list) or len(messages) != len(ROLES):
            found = f"{len(messages)} messages" if isinstance(messages, list) else repr(type(messages).__name__)
            raise InputError(
                path,
                f"expected a list of 3 messages (system, user, assistant), found {found}",
                line=line_no,
                field="messages",
            )
        system, user, assistant = (
            _check_message(m, role, path, line_no, f"messages[{i}]")
            for i, (m, role) in enumerate(zip(messages, ROLES, strict=True))
        )
        task = row.get("task", EXPLAIN)
        if task not in TASKS:
            raise InputError(path, f"task {task!r} is not one of {TASKS}", line=line_no, field="task")
        if task == EXPLAIN:
            parsed = parse_completion(assistant)
            answer = parsed.answer if parsed.valid else None
            expected = "`<think>…</think><answer>normal|abnormal</answer>`"
        else:
            answer, expected = parse_verdict(assistant), "`<answer>normal|abnormal</answer>`"
        if answer is None:
            raise InputError(path, f"assistant message is not {expected}", line=line_no, field="messages[2].content",
                             hint=f"found {assistant[:120]!r}")
        label = row.get("label", answer)
        try:
            label = label_id(label)
        except (ValueError, TypeError) as exc:
            raise InputError(path, str(exc), line=line_no, field="label") from exc
        if label != label_id(answer):
            raise InputError(path, f"label {label} disagrees with the assistant's answer '{answer}'", line=line_no,
                             field="label")
        records.append(
            {
                "prompt": [{"role": "system", "content": system}, {"role": "user", "content": user}],
                "completion": [{"role": "assistant", "content": assistant}],
                "template": str(row.get("template") or user),
                "dataset": str(row.get("dataset") or ""),
                "label": label,
                "rationale": str(row.get("rationale") or (parsed.think if task == EXPLAIN else "")),
                "task": task,
                "neighbours": [(str(t), label_id(y)) for t, y in row.get("neighbours") or []],
            }
        )
    if not records:
        raise InputError(path, "the SFT dataset is empty", hint="check the distill stage's report")
    return records

def balance_classes(records: list[dict[str, Any]], abnormal_fraction: float | None, seed: int,
                    field_name: str) -> tuple[list[dict[str, Any]], int]:
    """Repeat abnormal examples (drawn with replacement, seeded) until they make up `abnormal_fraction`.

    Anomalies are about a tenth of the templates; a small model trained a few CPU minutes on that
    mix learns to answer `normal` to everything. Returns the records and how many repeats were added;
    None, or a fraction the data already reaches, adds none. Raises InputError (naming `field_name`) when
    there is no abnormal example to repeat.
    """
    if abnormal_fraction is None:
        return records, 0
    fraction = float(abnormal_fraction)
    abnormal = [r for r in records if r["label"] == 1]
    if not abnormal:
        raise InputError("params.yaml", "the data has no abnormal example to balance with", field=field_name)
    # a + k = f (n + k)  =>  k = (f n - a) / (1 - f)
    extra = max(0, round((fraction * len(records) - len(abnormal)) / (1.0 - fraction)))
    from sklearn.utils import resample

    repeats = resample(abnormal, replace=True, n_samples=extra, random_state=seed) if extra else []
    return records + list(repeats), extra

def log_training_data(path: Path) -> str:
    """The training file as an MLflow dataset input, named and digested as the data flow logs it (md5 = DVC's)."""
    from tasks.common.tracking import log_dataset_file

    digest = md5_file(path)
    log_dataset_file(path, DATASET_NAME, "training", digest=digest)
    return digest
