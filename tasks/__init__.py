"""The pipeline's work. Code map: **a module at this level is a DVC stage** (one per stage in dvc.yaml,
each with `run(settings)` and a `__main__` that DVC calls as `python -m tasks.<stage>`):

    fetch        sources.yaml → data/raw (mirror or download, sha256 checked)
    base_model   the default GGUF (or an HF id / folder) → models/base
    correct      expert patch + review files → corrected templates, correction report
    split        seeded template-level train/test split, BGL_2k windows, HDFS sessions
    distill      CoT rationales from a teacher → data/sft/train.jsonl
    sft          CoT supervised fine-tuning (LoRA) → models/sft
    grpo         multi-reward GRPO from the SFT adapter → models/grpo
    evaluate     the candidate beside the baselines → reports/metrics.json, reports/eval/

Everything else sits in subpackages named for their role:

    common/      settings (typed params.yaml), config, errors, files, prompt/answer format, contracts
                 (metrics.json, serve state, reports), MLflow tracking, DVC calls, number formatting
    data/        expert review resolution (kappa), rationale teachers
    training/    what sft and grpo share: records, model and LoRA, callbacks, checkpoints, launcher, rewards
    evaluation/  test data, metrics, baselines, batched inference, the report
    release/     gate verdict, MLflow registry, pyfunc model, model card, lineage

`tasks/` imports neither Prefect nor typer: orchestration lives in `flows/`, the CLI in `rationanomaly/`.
"""
