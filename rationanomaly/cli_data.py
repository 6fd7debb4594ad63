"""`rationanomaly review`: resolve a folder of expert review files and show the agreement; `review export`: the
templates of detect outputs worth a label, as a review file (issue 20 item 1)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup


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


def review_export(
    outputs: Annotated[list[Path], typer.Argument(help="One or more JSON-lines files `rationanomaly detect --out` "
                                                       "wrote (one system or several).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="The review file to write, named for its annotator: "
                                                          "corrections/reviews/<your name>.csv. Written whole or "
                                                          "not at all; an existing file is kept (see --force).")],
    budget: Annotated[int | None, typer.Option(help="At most this many templates, the most valuable first "
                                                    "(default: every template worth a label).")] = None,
    cache: Annotated[Path | None, typer.Option(help="detect's verdict cache (detect.cache_file), read only: fills "
                                                    "scores, rationales and neighbour flags an older output "
                                                    "lacks.")] = None,
    threshold: Annotated[float | None, typer.Option(help="Verdict threshold the nearness term uses (default: the "
                                                         "one each template record carries).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --out (it may hold someone's labels).")] = False,
) -> None:
    """Rank the templates of detect outputs by the value of a person's label and write them as a review file.

    Value = (A + U + K) x log2(1 + lines), per template (tasks/data/review_export.py):

    A = 1 for an alert; U = 1 - |score - threshold| / max(threshold, 1 - threshold);

    K = 1 when no labelled neighbour of its system was shown. First-stage templates are left out.

    Fill `label` (normal/abnormal) on every row or delete the row; `correct` reads corrections/reviews/*.csv.
    """
    from tasks.data.review_export import export_review

    result = export_review(outputs, out, budget=budget, cache_file=cache, threshold=threshold, overwrite=force)
    typer.echo(f"{len(result.rows)} templates to label written to {out} (of {result.templates} read; left out: "
               f"{result.first_stage} decided by the first stage, {result.labelled} labelled already, "
               f"{result.no_value} confident normals with a "
               f"labelled neighbour shown, {result.over_budget} past --budget). Fill in `label` on every row "
               "(normal or abnormal) or delete the row.")


class DefaultCommandGroup(TyperGroup):
    """A command group that runs its `default` command when the first argument names none of its commands, so
    `rationanomaly review [FOLDER]` keeps resolving while `rationanomaly review export ...` exports."""

    default = "resolve"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = [self.default, *args]
        return super().parse_args(ctx, args)


def review_app(wrap: Callable[[Callable[..., None]], Callable[..., None]]) -> typer.Typer:
    """The `review` group: `resolve` (the default: `rationanomaly review [FOLDER]`) and `export`, each registered
    through `wrap` (the CLI's one-line errors)."""
    group = typer.Typer(cls=DefaultCommandGroup, help="Expert review files: resolve them (the default command) or "
                                                      "export detect's templates worth a label.",
                        no_args_is_help=False)
    group.command("resolve")(wrap(review))
    group.command("export")(wrap(review_export))
    return group
