"""index stage: the retrieval index of expert-labelled training templates, for prompts and the knn baselines.

Built from the training split only (data/split/train.parquet: never a validation or test template), so a
retrieved neighbour is always one whose label an expert decided and the model may learn from. Output:
models/index/ with the pickled tasks.common.retrieval.TemplateIndex and index.json (counts, the training
file's sha256, the prompt policy). The policy (k, floor, same_system, contrastive, features: params.yaml
`index`) is stored in the index, so every reader shows the same neighbours. Registered with every model
version and loaded by detect, the client and the pyfunc model.
"""

from __future__ import annotations

from typing import Any

from tasks.common.config import resolve_path
from tasks.common.files import atomic_dir, read_labelled_templates, sha256_file, write_json_atomic
from tasks.common.retrieval import INDEX_FILE, INDEX_META, TemplateIndex
from tasks.common.settings import IndexSettings, load_settings
from tasks.common.tracking import stage_run


def run(settings: IndexSettings) -> dict[str, Any]:
    """Build the index from `settings.train_file` into `settings.out_dir` (all-or-nothing); returns index.json.

    Raises InputError naming the training file when it is missing or malformed.
    """
    train_file = resolve_path(settings.train_file)
    frame = read_labelled_templates(train_file, ("dataset", "template", "label"),
                                    missing_hint="run `dvc repro split`", what="training templates")
    index = TemplateIndex(frame["template"].astype(str).tolist(), frame["label"].astype(int).tolist(),
                          frame["dataset"].astype(str).tolist(), settings.features, k=settings.k,
                          floor=settings.floor, same_system=settings.same_system, contrastive=settings.contrastive)
    meta = {"templates": len(index), "abnormal": int(index.labels.sum()), "train_file": settings.train_file,
            "train_sha256": sha256_file(train_file), "features": f"TF-IDF {settings.features} n-grams, cosine",
            "policy": index.policy()}
    with atomic_dir(resolve_path(settings.out_dir)) as staging:
        index.save(staging / INDEX_FILE)
        write_json_atomic(staging / INDEX_META, meta)
    return meta


def main() -> None:
    settings = load_settings().index
    meta = run(settings)
    with stage_run("index"):
        import mlflow

        mlflow.log_params({"k": settings.k, "features": settings.features, "bare_fraction": settings.bare_fraction,
                           "near_duplicate_similarity": settings.near_duplicate_similarity, "floor": settings.floor,
                           "same_system": settings.same_system, "contrastive": settings.contrastive})
        mlflow.log_metrics({"templates": meta["templates"], "abnormal": meta["abnormal"]})
        mlflow.log_artifacts(str(resolve_path(settings.out_dir)), artifact_path="index")
    print(f"index: {meta['templates']} training templates ({meta['abnormal']} abnormal) → {settings.out_dir}")


if __name__ == "__main__":
    main()
