"""index stage: the retrieval index of expert-labelled training templates, for prompts and the knn baselines.

Built from the training split only (data/split/train.parquet: never a validation or test template), so a
retrieved neighbour is always one whose label an expert decided and the model may learn from. Output:
models/index/ with the pickled tasks.common.retrieval.TemplateIndex and index.json (counts, the training
file's sha256, the prompt policy). The policy (k, floor, same_system, contrastive, features: params.yaml
`index`) is stored in the index, so every reader shows the same neighbours. Registered with every model
version and loaded by detect, the client and the pyfunc model.

Labels of new systems (issue 20): the resolved review records `correct` marks `new_system` (a system the
template lists do not hold, reports/review_resolution.json) are added to the index after the split, so they
are index-only knowledge: never a test item, never SFT data (a retrain's distill shows them only where a
prompt's policy would). `templates.csv` beside the index lists every indexed template with where its label
came from (`split` or `review`) and, for review labels, the review files and annotators; index.json counts them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.common.config import resolve_path
from tasks.common.errors import InputError
from tasks.common.files import atomic_dir, read_labelled_templates, sha256_file, write_json_atomic
from tasks.common.retrieval import INDEX_FILE, INDEX_META, TemplateIndex
from tasks.common.settings import IndexSettings, load_settings
from tasks.common.tracking import stage_run
from tasks.data.review import parse_label

TEMPLATES_TABLE = "templates.csv"  # every indexed template with its label's origin, beside index.pkl
TABLE_COLUMNS = ("dataset", "template", "label", "source", "annotators", "review_files", "resolved_by")


def new_system_labels(resolution_file: Path) -> pd.DataFrame:
    """The resolved review labels of new systems (records `correct` marked `new_system`) as TABLE_COLUMNS rows
    (source `review`; annotators and review files `;`-joined, in the order of the record's votes); empty when
    the file is absent. Raises InputError naming the file for JSON that is not a list of records."""
    rows = []
    if resolution_file.is_file():
        try:
            records = json.loads(resolution_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(resolution_file, f"not valid JSON: {exc.msg}", line=exc.lineno) from exc
        if not isinstance(records, list):
            raise InputError(resolution_file, "expected a JSON array of resolved review records")
        for number, record in enumerate(records):
            if not isinstance(record, dict) or not record.get("new_system"):
                continue
            try:
                label = parse_label(str(record.get("rectified")))
            except ValueError:
                raise InputError(resolution_file, f"record {number}: unknown label {record.get('rectified')!r}",
                                 field=f"[{number}].rectified") from None
            sources = record.get("sources") or []
            rows.append({"dataset": str(record["system"]), "template": str(record["input"]), "label": label,
                         "source": "review", "annotators": ";".join(record.get("annotators") or []),
                         "review_files": ";".join(dict.fromkeys(str(s.get("file")) for s in sources)),
                         "resolved_by": str(record.get("resolved_by") or "")})
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def run(settings: IndexSettings, resolution_file: str | Path | None = None) -> dict[str, Any]:
    """Build the index from `settings.train_file`, plus the new-system review labels of `resolution_file`
    (correct.resolution_file; None: none), into `settings.out_dir` (all-or-nothing); returns index.json.

    Raises InputError naming the training or resolution file when it is missing or malformed.
    """
    train_file = resolve_path(settings.train_file)
    train = read_labelled_templates(train_file, ("dataset", "template", "label"),
                                    missing_hint="run `dvc repro split`", what="training templates")
    train = train.assign(source="split", annotators="", review_files="", resolved_by="")
    reviewed = new_system_labels(resolve_path(resolution_file)) if resolution_file else \
        pd.DataFrame(columns=list(TABLE_COLUMNS))
    frame = pd.concat([train[list(TABLE_COLUMNS)], reviewed], ignore_index=True)
    index = TemplateIndex(frame["template"].astype(str).tolist(), frame["label"].astype(int).tolist(),
                          frame["dataset"].astype(str).tolist(), settings.features, k=settings.k,
                          floor=settings.floor, same_system=settings.same_system, contrastive=settings.contrastive)
    meta = {"templates": len(index), "abnormal": int(index.labels.sum()), "train_file": settings.train_file,
            "train_sha256": sha256_file(train_file), "features": f"TF-IDF {settings.features} n-grams, cosine",
            "policy": index.policy(), "review_labels": {
                "templates": len(reviewed), "abnormal": int(reviewed["label"].sum()) if len(reviewed) else 0,
                "systems": {str(k): int(v) for k, v in reviewed["dataset"].value_counts().sort_index().items()},
                "annotators": sorted({a for v in reviewed["annotators"] for a in v.split(";") if a}),
                "review_files": sorted({f for v in reviewed["review_files"] for f in v.split(";") if f}),
                "resolution_file": str(resolution_file) if resolution_file else None,
                "resolution_sha256": sha256_file(resolve_path(resolution_file))
                if resolution_file and resolve_path(resolution_file).is_file() else None},
            "table": TEMPLATES_TABLE}
    with atomic_dir(resolve_path(settings.out_dir)) as staging:
        index.save(staging / INDEX_FILE)
        write_json_atomic(staging / INDEX_META, meta)
        frame.to_csv(staging / TEMPLATES_TABLE, index=False, lineterminator="\n")
    return meta


def main() -> None:
    every = load_settings()
    settings = every.index
    meta = run(settings, every.correct.resolution_file)
    with stage_run("index"):
        import mlflow

        mlflow.log_params({"k": settings.k, "features": settings.features, "bare_fraction": settings.bare_fraction,
                           "near_duplicate_similarity": settings.near_duplicate_similarity, "floor": settings.floor,
                           "same_system": settings.same_system, "contrastive": settings.contrastive})
        mlflow.log_metrics({"templates": meta["templates"], "abnormal": meta["abnormal"],
                            "review_labels": meta["review_labels"]["templates"]})
        mlflow.log_artifacts(str(resolve_path(settings.out_dir)), artifact_path="index")
    print(f"index: {meta['templates']} templates ({meta['abnormal']} abnormal; "
          f"{meta['review_labels']['templates']} review labels of new systems) → {settings.out_dir}")


if __name__ == "__main__":
    main()
