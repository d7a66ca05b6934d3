"""The ``voxelflow`` command line. Heavy imports live inside the commands so ``--help`` answers at once."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(
    help="voxelflow: the whole life of a medical-imaging model, from arriving scans to a served model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
keys_app = typer.Typer(help="Manage API keys of the inference service.", no_args_is_help=True)
audit_app = typer.Typer(help="Inspect the tamper-evident audit log.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")
deploy_app = typer.Typer(help="Deployment targets of the inference service.", no_args_is_help=True)
app.add_typer(deploy_app, name="deploy")
console = Console(soft_wrap=True)
err = Console(stderr=True)

REPO = Path(__file__).resolve().parent.parent


def demo_spec() -> Path:
    """The demo spec of the project tree we run in (a checkout or an image's working directory)."""
    for root in (Path.cwd(), REPO):
        if (root / "deployments" / "specs" / "demo.yaml").exists():
            return root / "deployments" / "specs" / "demo.yaml"
    raise FileNotFoundError("deployments/specs/demo.yaml not found: run from the voxelflow project directory")


def fail(message: str, code: int = 1) -> None:
    from rich.markup import escape

    from voxelflow.core.redact import redact

    err.print(f"[red]error:[/] {escape(redact(message))}", highlight=False)
    raise typer.Exit(code)


@contextlib.contextmanager
def reasons():
    """Turn any failure into one line on stderr and a non-zero exit."""
    from voxelflow.spec.config import SpecError

    try:
        yield
    except typer.Exit:
        raise
    except SpecError as exc:
        fail(str(exc), 2)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - the CLI's contract is one line per failure
        if os.environ.get("VOXELFLOW_DEBUG"):
            raise
        fail(bad_settings(exc) or f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def bad_settings(exc: BaseException) -> str | None:
    """Settings() refused the environment: each bad setting by its variable's name, never its value."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError) or exc.title != "Settings":
        return None
    return "; ".join(f"VOXELFLOW_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors())


@contextlib.contextmanager
def stage_bars():
    """Rich progress bars fed by the tasks' progress reports."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tasks import progress as task_progress

    bars: dict[str, int] = {}
    with Progress(TextColumn("{task.description:<11}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=False) as progress:

        def listener(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                bars[stage] = progress.add_task(stage, total=total)
            progress.update(bars[stage], completed=done, total=total)

        task_progress.listeners.append(listener)
        try:
            yield
        finally:
            task_progress.listeners.remove(listener)


def run_lifecycle(spec, resume: bool = False, fresh: bool = False) -> dict:
    """Run the lifecycle flow in this process (Prefect's API or a temporary server)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.lifecycle import lifecycle

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), stage_bars():
        return lifecycle(spec, resume=resume, fresh=fresh)


def show(result: dict, name: str) -> None:
    from rich.markdown import Markdown

    from voxelflow.core.storage import Store
    from voxelflow.pipeline import LifecycleResult, markdown
    from voxelflow.spec.config import Settings

    console.print(Markdown(markdown(LifecycleResult(**result), name)))
    store = Store(Settings().store_url)
    for picture in result["pictures"]:
        console.print(f"picture: {store.url_of(picture)}", highlight=False)


DEMO_MIN_CASES = 12


@app.command()
def demo(
    cases: Annotated[int, typer.Option(min=1, help="how many synthetic cases to make (to run the lifecycle, at "
                                       "least the 12 the demo spec's split and gates need)")] = 12,
    data_only: Annotated[bool, typer.Option("--data-only", help="only synthesize the data")] = False,
) -> None:
    """Synthesize a small labelled dataset and run the whole lifecycle on the demo spec."""
    if cases < DEMO_MIN_CASES and not data_only:
        fail(f"--cases {cases}: the demo spec's split and gates need at least {DEMO_MIN_CASES} cases (3 on the test "
             "side, 3 for validation); --data-only makes any number", 2)
    with reasons():
        from voxelflow.data.synthetic import make_decathlon
        from voxelflow.spec.config import Settings, load_spec

        settings = Settings()
        dest = make_decathlon(settings.root / "incoming", n_cases=cases)
        console.print(f"data: {cases} synthetic cases (Decathlon layout) in {dest}", highlight=False)
        if data_only:
            return
        spec = load_spec(demo_spec())
        result = run_lifecycle(spec)
        show(result, spec.name)
        deployment = result["deployment"]
        if deployment is None:
            fail("the candidate did not pass the gates, so nothing was served: " + "; ".join(result["promotion"]["reasons"]))
        console.print(f"[bold green]HTTP prediction dice: {deployment['dice']:.4f}[/]")
        from voxelflow.core.redact import redact

        console.print(redact(
            "\nwhere to look:\n"
            f"  MLflow UI:   mlflow ui --backend-store-uri {settings.tracking_uri} --host 127.0.0.1\n"
            "  Prefect UI:  prefect server start --host 127.0.0.1   (then set PREFECT_API_URL=http://127.0.0.1:4200/api)\n"
            f"  store:       {settings.store_url}/datasets/{spec.name}\n"
            f"  database:    {settings.database}  (voxelflow ledger, voxelflow audit verify)"),
            highlight=False,
        )


SpecArg = Annotated[Path, typer.Argument(help="pipeline spec (YAML)")]
OverlayOpt = Annotated[Optional[list[Path]], typer.Option(help="overlay merged over the spec (repeatable)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="key.path=value override (repeatable)")]


def load(spec: Path, overlay: list[Path] | None, set_: list[str] | None):
    from voxelflow.spec.config import load_spec

    return load_spec(spec, overlays=list(overlay or []), sets=list(set_ or []))


@app.command()
def run(
    spec: SpecArg, overlay: OverlayOpt = None, set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the latest failed lifecycle of this spec's "
                                         "pipeline from its failed step (training from its newest checkpoint)")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="compute every step again, ignoring the results recorded by "
                                        "earlier lifecycles with the same inputs")] = False,
) -> None:
    """Run the lifecycle on any spec, with overlays and --set overrides; finished work with the same inputs is
    reused (--fresh: not), --resume continues a failed lifecycle."""
    with reasons():
        if resume and fresh:
            fail("--resume reuses the failed lifecycle's finished steps and --fresh ignores them: give one", 2)
        loaded = load(spec, overlay, set_)
        result = run_lifecycle(loaded, resume=resume, fresh=fresh)
        show(result, loaded.name)
        if result["deployment"]:
            console.print(f"[bold green]HTTP prediction dice: {result['deployment']['dice']:.4f}[/]")


@app.command()
def validate(spec: SpecArg, overlay: OverlayOpt = None, set_: SetOpt = None) -> None:
    """Check a spec (and its overlays) without running anything; print the merged result, the migrations of an
    older spec and the resolved step graph."""
    with reasons():
        import warnings

        import yaml

        from voxelflow.spec import graph
        from voxelflow.spec.migrations import SpecMigrated

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SpecMigrated)
            loaded = load(spec, overlay, set_)
        console.print(yaml.safe_dump(loaded.model_dump(mode="json", by_alias=True), sort_keys=False),
                      highlight=False, markup=False)
        for warning in caught:
            if isinstance(warning.message, SpecMigrated):
                err.print(f"warning: {warning.message}", highlight=False, markup=False, soft_wrap=True)
        console.print("steps, in order:", highlight=False)
        console.print(graph.build(loaded).tree(), highlight=False, markup=False)
        if loaded.candidates is not None:
            from voxelflow.spec.candidates import listing

            console.print(listing(loaded), highlight=False, markup=False)
        console.print(f"[green]ok[/] spec digest {loaded.digest()}")


@app.command()
def schema(
    path: Annotated[Optional[Path], typer.Argument(help="with --markdown: the page to write "
                                                   "(default docs/spec-reference.md)")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="write the reference page of every key "
                                           "instead of the schema")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="write the JSON Schema to this file "
                                                   "instead of printing it")] = None,
) -> None:
    """Print the spec's JSON Schema (draft 2020-12), write it (--output), or write the reference of every
    key (--markdown [PATH])."""
    with reasons():
        from voxelflow.spec import docs as spec_docs

        if path is not None and not markdown:
            fail("PATH is the reference page's (with --markdown); write the schema with --output PATH", 2)
        if markdown and output is not None:
            fail("--markdown and --output write different files: give one of them", 2)
        if markdown:
            target = path or spec_docs.MARKDOWN_PATH
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(spec_docs.markdown())
            err.print(f"wrote {target}", highlight=False, markup=False)
        elif output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(spec_docs.schema_text())
            err.print(f"wrote {output}", highlight=False, markup=False)
        else:
            sys.stdout.write(spec_docs.schema_text())


@app.command()
def ingest(
    source: Annotated[str, typer.Argument(help="folder or fsspec URL (s3://...) holding the arrived data")],
    spec: Annotated[Optional[Path], typer.Option(help="pipeline spec (default: the demo spec)")] = None,
    layout: Annotated[Optional[str], typer.Option(help="decathlon, folder, dicom or mixed (default: the spec's)")] = None,
    json_: Annotated[bool, typer.Option("--json", help="end with one JSON line of object counts")] = False,
) -> None:
    """Ingest what is under SOURCE now; every object ends ingested, duplicate or quarantined."""
    with reasons():
        import json

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        from rich.table import Table

        from voxelflow.pipeline import Context, ingest_stage
        from voxelflow.spec.config import Settings, load_spec

        sets = [f"data.source={source}"] + ([f"data.layout={layout}"] if layout else [])
        loaded = load_spec(spec or demo_spec(), sets=sets)
        ctx = Context(Settings(), loaded.name)
        with Progress(TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), console=err) as bar:
            task = bar.add_task("ingest", total=None)
            report = ingest_stage(loaded.data, ctx, progress=lambda done, total: bar.update(task, completed=done,
                                                                                             total=total),
                                  require_cases=False)
        counts = {state: report.objects.get(state, 0) for state in ("ingested", "duplicate", "quarantined")}
        table = Table("objects", "count", title=f"{loaded.name}: {source}")
        table.add_row("arrived", str(sum(counts.values())))
        for state, n in counts.items():
            table.add_row(state, str(n))
        table.add_row("already in the ledger", str(report.seen))
        console.print(table)
        for q in report.quarantined:
            console.print(f"quarantined {q['reason']}: {q['detail']}", highlight=False)
        for s in report.superseded:
            console.print(f"{s['by']} replaces {s['case'] or 'quarantined objects'} ({s['regrouped']} objects "
                          "regrouped: a series that grew, a label that came later, or a replaced file)",
                          highlight=False)
        console.print(f"dataset {report.dataset_digest}: {len(report.case_ids)} cases", highlight=False)
        if json_:
            print(json.dumps({"arrived": sum(counts.values()), **counts, "already_seen": report.seen,
                              "superseded": [s["case"] for s in report.superseded if s["case"]],
                              "cases": len(report.case_ids), "dataset_digest": report.dataset_digest}))


@app.command()
def predict(
    source: Annotated[Optional[str], typer.Argument(
        help="folder or fsspec URL (s3://...) holding the arrived data; with --resend: the destination whose "
        "pending results to send (default: every pending result, to the destination it was meant for)")] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="folder or fsspec URL the masks and volumes.csv go "
                                                             "to")] = None,
    send: Annotated[Optional[str], typer.Option("--send", help="send the DICOM results (SEG, SR) to "
                                                "dicom://AE_TITLE@host:port or dicomweb+http(s)://host/path")] = None,
    resend: Annotated[bool, typer.Option("--resend", help="send the results whose send failed, then stop")] = False,
    model: Annotated[Optional[str], typer.Option(help="NAME@ALIAS or NAME/VERSION (default: the spec's "
                                                      "promote.model_name@champion)")] = None,
    spec: Annotated[Optional[Path], typer.Option(help="pipeline spec (default: the demo spec)")] = None,
    layout: Annotated[Optional[str], typer.Option(help="decathlon, folder, dicom or mixed (default: the spec's)")] = None,
    json_: Annotated[bool, typer.Option("--json", help="end with one JSON line of counts")] = False,
) -> None:
    """Ingest SOURCE, then segment each unlabelled case there with a registered model: NIfTI masks and volumes.csv."""
    with reasons():
        import json

        from voxelflow.serving import dicom_send

        if resend:
            again = dicom_send.resend_command(send or source, console.print)
            if again.pending or again.refused:
                fail(dicom_send.unsent_message(again))
            return
        if source is None or out is None:
            fail("predict needs SOURCE and --out (or --resend)", 2)
        if send is not None:
            try:  # before anything is read or written
                dicom_send.Destination.parse(send)
            except dicom_send.DestinationError as exc:
                fail(str(exc), 2)

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.table import Table

        from voxelflow.pipeline import Context, ingest_stage
        from voxelflow.serving import predict as batch
        from voxelflow.spec.config import Settings, load_spec

        sets = [f"data.source={source}"] + ([f"data.layout={layout}"] if layout else [])
        loaded = load_spec(spec or demo_spec(), sets=sets)
        try:
            ref = batch.ModelRef.parse(model or loaded.promote.model_name)
        except ValueError as exc:
            fail(str(exc), 2)
        ctx = Context(Settings(), loaded.name)
        src, dest = ctx.settings.expand(source), ctx.settings.expand(out)
        batch.check_destination(dest, src)  # before anything is read or written
        with Progress(TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err) as bar:
            ingesting = bar.add_task("ingest", total=None)
            arrived = ingest_stage(loaded.data, ctx, require_cases=False,
                                   progress=lambda done, total: bar.update(ingesting, completed=done, total=total))
            segmenting = bar.add_task("predict", total=None)
            report = batch.run(ctx.db, ctx.layout, ctx.tracking_uri, ref, dest, source=src,
                               progress=lambda done, total: bar.update(segmenting, completed=done, total=total))
        for q in arrived.quarantined:
            console.print(f"quarantined {q['reason']}: {q['detail']}", highlight=False)
        if report.version is None:
            console.print(f"nothing to segment: no unlabelled case under {source} "
                          f"({len(report.labelled)} labelled case(s) left alone)", highlight=False)
        else:
            table = Table("case", "mask", *(f"label {k} (mL)" for k in sorted(
                {k for p in report.predicted for k in p["volumes_ml"]}, key=int)), title=f"{ref} (version {report.version})")
            for p in report.predicted:
                table.add_row(p["case"], p["mask"].rsplit("/", 1)[-1], *(f"{v:g}" for _, v in sorted(
                    p["volumes_ml"].items(), key=lambda kv: int(kv[0]))))
            if report.predicted:
                console.print(table)
            console.print(f"{len(report.predicted)} segmented, {len(report.skipped)} already segmented by version "
                          f"{report.version}, {len(report.failed)} failed, {len(report.labelled)} labelled left alone;"
                          f" masks in {report.folder}" + (f", volumes in {report.table}" if report.table else ""),
                          highlight=False)
        sent = dicom_send.send_command(send, loaded.name, report, console.print) if send else None
        if json_:
            print(json.dumps({**report.summary(), "quarantined": len(arrived.quarantined),
                              **({"sent": sent.summary()} if sent else {})}))
        if sent is not None and (sent.pending or sent.refused):
            fail(dicom_send.unsent_message(sent))
        if report.failed:
            fail(f"{len(report.failed)} case(s) could not be segmented (the others were written): "
                 + "; ".join(f"{f['case']}: {f['reason']}" for f in report.failed[:3]))


@app.command()
def watch(
    source: Annotated[Optional[str], typer.Argument(
        help="folder or fsspec URL (s3://...) to watch, or a PACS's DICOMweb root (dicomweb+http(s)://host/path); "
             "default: the spec's triggers.arrival.source, else its data.source")] = None,
    spec: Annotated[Path, typer.Option(help="pipeline spec the arriving data belongs to")] = ...,
    settle: Annotated[Optional[float], typer.Option(
        help="seconds without change before a batch is announced; default: the spec's triggers.arrival.settle_s, "
             "else 2")] = None,
    poll: Annotated[float, typer.Option(help="seconds between listings (object stores; folders wake at once)")] = 2.0,
) -> None:
    """Run until stopped: announce each settled batch under SOURCE as the Prefect event voxelflow.data.arrived.

    The event concerns the spec's pipeline (resource voxelflow.dataset.<name>) and carries data references
    only; the deployments it triggers run with the spec they were made with."""
    with reasons():
        import signal
        import threading

        from flows.announce import send
        from voxelflow.core.db import connect
        from voxelflow.data.watch import DATA_ARRIVED, ROUTE_LABEL, ROUTE_SOURCE, ROUTE_SPOOL, Watcher
        from voxelflow.spec.config import Settings, load_spec

        settings = Settings()
        base = load_spec(spec)
        arrival = base.triggers.arrival
        if source is None:
            source = settings.expand(arrival.source if arrival and arrival.source else base.data.source)
        if settle is None:
            settle = arrival.settle_s if arrival else 2.0
        loaded = load_spec(spec, sets=[f"data.source={source}"])

        # a PACS's series go through the spool (predict-arrived routes them), a folder's files to ingest-arrived
        route = ROUTE_SPOOL if source.startswith("dicomweb+") else ROUTE_SOURCE

        def emit(arrival) -> None:  # raises when the event was not delivered: the batch stays unannounced
            send(DATA_ARRIVED, loaded.name, arrival.payload(), arrival.id, {ROUTE_LABEL: route})
            console.print(f"announced {len(arrival.objects)} objects ({arrival.payload()['bytes']} bytes)",
                          highlight=False)

        if source.startswith("dicomweb+"):  # a PACS: QIDO-RS polls, WADO-RS into the spool
            from voxelflow.data.dicomweb_watch import DicomwebWatcher, dicomweb_spool

            try:
                watcher = DicomwebWatcher(source, connect(settings.database), loaded.name, dicomweb_spool(
                    settings.store_url, loaded.name, settings.root), emit, settings, settle_s=settle, poll_s=poll)
            except ValueError as exc:
                fail(str(exc), 2)
        else:
            watcher = Watcher(source, connect(settings.database), loaded.name, emit, settle_s=settle, poll_s=poll)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        console.print(f"watching {source} for {loaded.name} (settle {settle:g} s); Ctrl-C stops", highlight=False)

        def retry(exc: Exception) -> None:
            from voxelflow.core.redact import redact

            err.print(f"not announced, trying again in {poll:g} s: {redact(f'{type(exc).__name__}: {exc}')}",
                      highlight=False, markup=False)

        watcher.run(stop, on_error=retry)


@app.command()
def ledger(
    pipeline: Annotated[str, typer.Argument(help="pipeline name (the spec's `name`)")] = "demo-spheres",
    state: Annotated[Optional[str], typer.Option(help="only ingested, duplicate or quarantined")] = None,
    json_: Annotated[bool, typer.Option("--json", help="print one JSON array instead of a table")] = False,
) -> None:
    """Show where every arrived object ended: ingested, duplicate or quarantined."""
    with reasons():
        import json

        from rich.table import Table

        from voxelflow.core.db import connect
        from voxelflow.data.ingest import read_ledger
        from voxelflow.spec.config import Settings

        if state not in (None, "ingested", "duplicate", "quarantined"):
            fail(f"--state must be ingested, duplicate or quarantined, not {state!r}", 2)
        rows = read_ledger(connect(Settings().database), pipeline, state)
        if json_:
            print(json.dumps(rows))
            return
        table = Table("at", "state", "case", "object", "sha256", "reason")
        for r in rows:
            case = r["case_id"] or ""
            if r["superseded_by"]:  # out of the dataset: a later case holds all of its objects
                case += f" (superseded by {r['superseded_by']})"
            table.add_row(r["at"], r["state"], case, r["object"], r["sha256"][:12], r["reason"] or "")
        console.print(table)
        console.print(f"{len(rows)} objects")


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="registered model name")] = "demo-spheres",
    alias: Annotated[str, typer.Option(help="model alias to serve")] = "champion",
    host: Annotated[Optional[str], typer.Option(help="bind address (default from settings: 127.0.0.1)")] = None,
    port: Annotated[Optional[int], typer.Option(help="port (default from settings: 8000)")] = None,
    poll_seconds: Annotated[float, typer.Option(help="how often to look for a moved alias (one registry "
                                                  "lookup); with a Prefect API a promotion's notice swaps the "
                                                  "champion in at once")] = 5.0,
) -> None:
    """Serve a registered model over HTTP (API keys, throttling, health, metrics)."""
    from voxelflow.core.memory import keep_freed_memory

    keep_freed_memory()  # before any thread: each inference reuses the memory the last one freed
    with reasons():
        import tempfile

        import uvicorn
        from pydantic import ValidationError

        from voxelflow.core.db import connect
        from voxelflow.core.redact import redact
        from voxelflow.learn.devices import visible_gpus
        from voxelflow.release import registry
        from voxelflow.serving import serve_gpu
        from voxelflow.serving.serve import KeyStore, ModelHolder, create_app, proxy_options
        from voxelflow.spec.config import Settings

        try:
            settings = Settings()
        except ValidationError as exc:  # each bad setting by its variable's name, never its value
            fail("; ".join(f"VOXELFLOW_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
                           for e in exc.errors()))
        proxies = proxy_options(settings.serve_trusted_proxies)  # X-Forwarded-For only from these peers
        service_log()
        placed = serve_gpu.plan(visible_gpus(), settings.serve_per_gpu, settings.serve_workers, os.cpu_count() or 1)
        console.print(placed.describe())
        db = connect(settings.database)
        cache = Path(tempfile.mkdtemp(prefix="voxelflow-serve-"))
        # loaded on the CPU; on GPUs each load also makes one replica per GPU
        holder = ModelHolder(lambda: registry.load_segmenter(settings.tracking_uri, model, cache, alias, device="cpu"),
                             replicate=placed.replicate if placed.devices else None)
        try:
            version = holder.reload()
            console.print(f"serving {model}@{alias} (v{version}); create a key with `voxelflow keys create NAME`")
        except LookupError as exc:  # not promoted yet: stay up, not ready, and keep looking
            console.print(f"waiting for a model: {redact(str(exc))}", markup=False)
        holder.watch(lambda: registry.alias_version(settings.tracking_uri, model, alias), poll_seconds)
        if alias == "champion" and os.environ.get("PREFECT_API_URL"):  # promotions are pushed: swap at once
            import threading

            from flows.announce import follow_champion

            threading.Thread(target=follow_champion, args=(model, lambda _version: holder.nudge(), threading.Event()),
                             name="voxelflow-champion-notices", daemon=True).start()
            console.print("following champion notices from the Prefect API (and polling every "
                          f"{poll_seconds:g} s)", highlight=False)
        def describe() -> dict:
            mv = registry.client(settings.tracking_uri).get_model_version(model, holder.version)
            return {"model": model, "alias": alias, "aliases": list(mv.aliases),
                    "tags": {k: v for k, v in mv.tags.items() if k.startswith("voxelflow.")}}

        app_ = create_app(holder, KeyStore(db), db=db, workers=placed.workers, queue=settings.serve_queue,
                          timeout_s=settings.serve_timeout_s, max_voxels=settings.serve_max_voxels,
                          docs=settings.serve_docs, describe=describe,
                          memory_budget=settings.serve_memory_budget_mb * 2**20, gpus=placed.devices,
                          per_gpu=placed.per_gpu)
        tls = {}
        if settings.serve_tls_cert or settings.serve_tls_key:
            if not (settings.serve_tls_cert and settings.serve_tls_key):
                fail("HTTPS needs both VOXELFLOW_SERVE_TLS_CERT and VOXELFLOW_SERVE_TLS_KEY")
            tls = {"ssl_certfile": settings.serve_tls_cert, "ssl_keyfile": settings.serve_tls_key}
        # the service logs each request itself, as one JSON line (uvicorn's own access lines would repeat them)
        uvicorn.run(app_, host=host or settings.serve_host, port=port or settings.serve_port, log_level="info",
                    access_log=False, **proxies, **tls)


def service_log() -> None:
    """The service's log (``voxelflow.serving.serve``: one JSON line per request, hot swaps, failed loads) on
    stderr at INFO, each line as it was written."""
    import logging

    log = logging.getLogger("voxelflow.serving.serve")
    if not any(getattr(h, "voxelflow_service", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.voxelflow_service = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


@deploy_app.command("render")
def deploy_render(spec: SpecArg, overlay: OverlayOpt = None, set_: SetOpt = None) -> None:
    """Print the Kubernetes manifests of a spec with deploy.target: kubernetes (apply them with kubectl)."""
    with reasons():
        from voxelflow.serving import k8s_deploy

        print(k8s_deploy.to_yaml(k8s_deploy.render(load(spec, overlay, set_))), end="")


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="who the key is for")],
    role: Annotated[list[str], typer.Option(help="viewer, predictor, operator or admin (repeatable)")] = [  # noqa: B006
        "predictor"],
    expires: Annotated[Optional[float], typer.Option(help="days until the key stops working")] = None,
) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    with reasons():
        from voxelflow.core import audit
        from voxelflow.core.db import connect
        from voxelflow.serving.serve import KeyStore
        from voxelflow.spec.config import Settings

        db = connect(Settings().database)
        key = KeyStore(db).create(name, role, expires)
        audit.append(db, "keys.created", os.environ.get("USER", "cli"), name=name, roles=sorted(role),
                     expires_days=expires)
        print(key)


@keys_app.command("list")
def keys_list() -> None:
    """List keys: name, roles, created, expires (never the keys themselves)."""
    with reasons():
        from rich.table import Table

        from voxelflow.core.db import connect
        from voxelflow.serving.serve import KeyStore
        from voxelflow.spec.config import Settings

        table = Table("name", "roles", "created", "expires")
        for k in KeyStore(connect(Settings().database)).list():
            table.add_row(k["name"], ",".join(k["roles"]), k["created"][:19],
                          (k["expires"] or "never")[:19] + (" (expired)" if k["expired"] else ""))
        console.print(table)


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="whose keys to remove (all of them)")]) -> None:
    """Revoke every key of NAME at once; exit 1 when there was none."""
    with reasons():
        from voxelflow.core import audit
        from voxelflow.core.db import connect
        from voxelflow.serving.serve import KeyStore
        from voxelflow.spec.config import Settings

        db = connect(Settings().database)
        n = KeyStore(db).revoke_name(name)
        if not n:
            fail(f"no key named {name!r}")
        audit.append(db, "keys.revoked", os.environ.get("USER", "cli"), name=name, keys=n)
        console.print(f"revoked {n} key(s) of {name!r}")


@audit_app.command("verify")
def audit_verify(
    anchors: Annotated[bool, typer.Option(help="also check the newest head copy kept in MLflow model version tags "
                                               "(catches deleted newest records); --no-anchors: chain only")] = True,
) -> None:
    """Check the audit log's hash chain and its newest anchor; exit 1 and name the first problem."""
    with reasons():
        from voxelflow.core import audit
        from voxelflow.core.db import connect
        from voxelflow.spec.config import Settings

        settings = Settings()
        db = connect(settings.database)
        kept = audit.mlflow_anchors(settings.tracking_uri) if anchors else []
        verdict = audit.verify(db, kept)
        if not verdict.ok:
            fail(f"audit log in {db} is not intact: {verdict.problem}")
        against = (f"matches the anchor at record {verdict.anchor.seq} in {verdict.anchor.where}" if verdict.anchor
                   else "no anchor to check against yet" if anchors else "anchors not checked")
        console.print(f"[green]ok[/] {verdict.entries} entries, chain intact, {against} ({db})", highlight=False)


@app.command()
def rollback(
    model: Annotated[str, typer.Argument(help="registered model name")],
    reason: Annotated[str, typer.Option(help="why; kept in the audit log and on the version")] = "",
    operation: Annotated[str, typer.Option(
        help="this rollback's id (a fresh one if not given); run again with the id it printed after a failure, "
             "and the rollback it started is completed, never repeated")] = "",
) -> None:
    """Move `champion` back to `previous`; exit 1 with the reason when there is no previous version."""
    with reasons():
        import getpass
        import uuid

        from voxelflow.core import audit
        from voxelflow.core.db import connect
        from voxelflow.release import registry
        from voxelflow.spec.config import Settings

        settings, op = Settings(), operation.strip() or uuid.uuid4().hex
        try:
            db = connect(settings.database)
            restored, replaced = registry.rollback(settings.tracking_uri, db, model, getpass.getuser(),
                                                   audit.Sink(db, settings.tracking_uri), reason, operation=op)
        except (registry.NoPrevious, registry.AliasesMoved) as exc:
            fail(str(exc.args[0]))
        except Exception as exc:  # noqa: BLE001 - said with the id that completes it
            fail(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (rollback {op}: run "
                 f"`voxelflow rollback {model} --operation {op}` to complete it)")
        console.print(f"[green]ok[/] {model}: champion is version {restored} again (was {replaced or 'none'}), "
                      f"rollback {op}", highlight=False)


@app.command()
def approve(
    model: Annotated[str, typer.Argument(help="registered model name")],
    version: Annotated[str, typer.Argument(help="the version to make champion: the challenger awaiting approval")],
    reason: Annotated[str, typer.Option(help="why; kept on the version and in the audit log")] = "",
    override: Annotated[str, typer.Option(
        help="why to promote a version the gates did not let through (not the challenger, not awaiting "
             "approval, a gate failed); recorded as an override on the version and in the audit log")] = "",
) -> None:
    """A person promotes VERSION, the gated challenger awaiting approval (promote.approval: manual); the
    old champion stays previous. Anything else is refused with the reason, unless --override says why."""
    with reasons():
        import getpass

        from voxelflow.core.db import connect
        from voxelflow.release import promotion
        from voxelflow.spec.config import Settings

        settings = Settings()
        try:
            old = promotion.approve(settings.tracking_uri, connect(settings.database), model, version,
                                    getpass.getuser(), reason, override=override or None)
        except promotion.NotApprovable as exc:
            fail(str(exc.args[0]))
        console.print(f"[green]ok[/] {model}: champion is version {version} (previous: {old or 'none'})"
                      + (" by override" if override.strip() else ""), highlight=False)


@app.command()
def lineage(
    ref: Annotated[str, typer.Argument(help="NAME (its champion), NAME@ALIAS or NAME/VERSION")],
    as_json: Annotated[bool, typer.Option("--json", help="print the trace as JSON")] = False,
) -> None:
    """Trace a model version back to its source files; exit 1 when a link is missing or does not check."""
    with reasons():
        import json

        from voxelflow.core.db import connect
        from voxelflow.release import lineage as lineage_
        from voxelflow.spec.config import Settings

        settings = Settings()
        trace = lineage_.trace(settings.tracking_uri, connect(settings.database), settings.store_url, ref)
        print(json.dumps(trace, indent=1, default=str) if as_json else lineage_.render(trace))
        if trace["problems"]:
            fail(f"lineage of {ref} is incomplete: {trace['problems'][0]}"
                 + (f" (and {len(trace['problems']) - 1} more)" if len(trace["problems"]) > 1 else ""))


@app.command()
def version() -> None:
    """Print voxelflow's version."""
    from voxelflow import __version__

    print(__version__)


from flows.receive import receive as _receive  # noqa: E402 - the command lives in its own module

app.command(name="receive")(_receive)

from flows.up import down, up  # noqa: E402 - the commands' own module imports the CLI's helpers when called

app.command()(up)
app.command()(down)

from flows.worker import worker  # noqa: E402 - the command's own module

app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(worker)

def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()

