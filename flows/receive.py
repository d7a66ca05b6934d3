"""``voxelflow receive``: a DICOM Storage SCP whose settled series are announced as ``voxelflow.data.arrived``.

The library's :class:`voxelflow.data.receive.Receiver` does the receiving; this command gives it the
spec's pipeline, the settings (callers, TLS, limits, store, database) and an ``emit`` that sends each
arrival to Prefect the way ``voxelflow watch`` does (:func:`flows.announce.send`): an event that was not
delivered leaves its series unannounced, and it is sent again, under the same id, a moment later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def receive(
    spec: Annotated[Path, typer.Option(help="pipeline spec the received series belong to")],
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on (0: any free port)", min=0, max=65535)] = 11112,
    ae_title: Annotated[str, typer.Option(help="this receiver's AE title (callers must call it)")] = "VOXELFLOW",
    settle: Annotated[float, typer.Option(help="seconds without a new instance before a series is announced")] = 2.0,
) -> None:
    """Run until stopped: receive DICOM (C-STORE, C-ECHO) from the callers in VOXELFLOW_DICOM_CALLERS into the
    spool, and announce each complete series as the Prefect event voxelflow.data.arrived.

    A series is complete once the associations that sent it were released and nothing of it arrived for
    --settle seconds. The event carries hashes only (study, series, content); the instances stay in the
    store's spool/ prefix."""
    from flows.cli import console, err, reasons

    with reasons():
        import signal
        import threading

        from flows.announce import send
        from voxelflow.core.db import connect
        from voxelflow.core.redact import redact
        from voxelflow.data.receive import Limits, Receiver, receive_spool, tls_context
        from voxelflow.data.watch import DATA_ARRIVED, ROUTE_LABEL, ROUTE_SPOOL
        from voxelflow.spec.config import Settings, load_spec

        loaded = load_spec(spec)
        settings = Settings()

        def emit(arrival) -> None:  # raises when the event was not delivered: the series stays unannounced
            send(DATA_ARRIVED, loaded.name, arrival.payload(), arrival.id, {ROUTE_LABEL: ROUTE_SPOOL})
            console.print(f"announced a series of {len(arrival.objects)} instances "
                          f"({arrival.payload()['bytes']} bytes)", highlight=False)

        receiver = Receiver(
            receive_spool(settings.store_url, loaded.name, settings.root), connect(settings.database), emit,
            callers=settings.dicom_callers, limits=Limits.from_settings(settings), ae_title=ae_title, host=host,
            port=port, settle_s=settle,
            ssl_context=tls_context(settings.dicom_tls_cert, settings.dicom_tls_key, settings.dicom_tls_ca))
        if not receiver.callers:
            err.print("VOXELFLOW_DICOM_CALLERS is empty: every association will be rejected", highlight=False)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())

        def retry(exc: Exception) -> None:
            err.print(f"not announced, trying again: {redact(f'{type(exc).__name__}: {exc}')}",
                      highlight=False, markup=False)

        def started() -> None:
            console.print(f"receiving DICOM for {loaded.name} as {ae_title} on {host}:{receiver.port}"
                          f"{' (TLS)' if receiver.ssl_context else ''}, {len(receiver.callers)} callers allowed, "
                          f"settle {settle:g} s; Ctrl-C stops", highlight=False)

        receiver.run(stop, on_error=retry, on_start=started)
