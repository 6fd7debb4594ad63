"""The pipeline's work. Code map: **a module at this level is a DVC stage** (one per stage in dvc.yaml,
each with `run(settings)` and a `__main__` that DVC calls as `python -m tasks.<stage>`):

    fetch        sources.yaml → data/raw (mirror or download, sha256 checked)
    base_model   the default GGUF (or an HF id / folder) → models/base
    correct      expert patch + review files → corrected templates, correction report
    split        seeded template-level train/validation/test split, BGL_2k windows, HDFS sessions
    index        retrieval index of the expert-labelled training templates → models/index
    distill      CoT rationales from a teacher, explain and verdict examples → data/sft/train.jsonl
    sft          CoT supervised fine-tuning (LoRA) → models/sft
    grpo         multi-reward GRPO from the SFT adapter → models/grpo
    evaluate     the calibrated candidate beside the baselines, with intervals → reports/metrics.json,
                 reports/eval/ (report, plots, calibration.json)

Everything else sits in subpackages named for their role:

    common/      settings (typed params.yaml), config, errors, files, prompt/answer format and verdict score,
                 contracts (metrics.json, serve state, reports), retrieval index, tokenizers, adapters,
                 MLflow tracking, DVC calls, number formatting
    detection/   raw log lines → framing, records, drain3 templates, verdict cache (the `detect` path)
    data/        expert review resolution (kappa), rationale teachers
    training/    what sft and grpo share: records, model and LoRA, callbacks, checkpoints, launcher, rewards
    evaluation/  test data, metrics and bootstrap intervals, baselines, batched inference and scoring,
                 threshold calibration, rationale checks, the served path, the report
    release/     gate verdict, MLflow registry, pyfunc model, model card, lineage

`tasks/` imports neither Prefect nor typer: orchestration lives in `flows/`, the CLI in `rationanomaly/`.
"""
