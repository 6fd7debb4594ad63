"""`rationanomaly review`: resolve a folder of expert review files and show the agreement."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def review(
    review_dir: Annotated[Path | None, typer.Argument(help="Folder of <annotator>.csv files "
                                                           "(default: correct.review_dir).")] = None,
    senior: Annotated[str | None, typer.Option(help="Senior reviewer who breaks ties "
                                                    "(default: correct.senior_reviewer).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the resolution here (anomaly_patch.json format).")] = None,
) -> None:
    """Resolve expert review files by majority (senior breaks ties) and print Cohen's/Fleiss' kappa."""
    from tasks.common.config import repo_root
    from tasks.common.errors import InputError
    from tasks.common.files import write_text_atomic
    from tasks.common.settings import load_settings
    from tasks.correct import load_templates
    from tasks.data.review import review_folder

    try:
        settings, root = load_settings().correct, repo_root()
        folder = review_dir or root / settings.review_dir
        originals: dict[str, int] = {}
        for name, path in settings.template_files.items():  # fills each record's `label` once data/raw is fetched
            if (root / path).exists():
                frame = load_templates(root / path, name)
                originals.update(zip(frame["template"].str.strip(), frame["label_original"], strict=True))
        result = review_folder(folder, senior or settings.senior_reviewer, originals)
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    if result is None:
        typer.echo(f"{folder}: no review files")
        return
    typer.echo(json.dumps(result.summary(), indent=2))
    if out:
        write_text_atomic(out, json.dumps(result.records, indent=2, ensure_ascii=False) + "\n")
        typer.echo(f"resolution written to {out}")
