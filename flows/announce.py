"""Sending voxelflow's events to Prefect so that a lost one fails the sender instead of a retrain.

``prefect.events.emit_event`` queues an event for a background thread and only logs when it cannot be
sent. :func:`send` posts it to the API's ``/events`` and returns once the server answered that it was
published (a websocket's answered ping would only say it was received: closing the socket right after
was seen to lose it), raising when it was not: the caller records the
announcement only after ``send`` returned (:mod:`voxelflow.data.watch`). The event's id is the caller's
(:func:`voxelflow.data.watch.announcement_id`), so a retry sends the same one again, and Prefect's trigger
service, which remembers the ids it has seen, starts no second run for it.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from voxelflow.data.watch import resource_id


def event_for(event: str, pipeline: str, payload: dict[str, Any], event_id: UUID,
              labels: dict[str, str] | None = None):
    """The Prefect event ``event`` about ``pipeline`` (resource ``voxelflow.dataset.<pipeline>``, with ``labels``
    besides, e.g. an arrival's route). It names no related flow run: with one, the server was seen to take
    seconds longer to start the triggered run."""
    from prefect.events import Event

    return Event(event=event, resource={"prefect.resource.id": resource_id(pipeline), "voxelflow.pipeline": pipeline,
                                        **(labels or {})}, payload=payload, id=event_id)


def post(events: list) -> None:
    """POST ``events`` to the Prefect API's ``/events``: it answers once they were published to the server's
    event bus (triggers and storage); an error status or no answer raises."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.request("POST", "/events", json=[e.model_dump(mode="json") for e in events])


def send(event: str, pipeline: str, payload: dict[str, Any], event_id: UUID,
         labels: dict[str, str] | None = None) -> None:
    """Send one event and wait until the Prefect API accepted it; raise when it was not delivered."""
    post([event_for(event, pipeline, payload, event_id, labels)])


CHAMPION_MOVED = "voxelflow.model.champion"  # the registered model's champion alias points at another version


def model_resource(model_name: str) -> str:
    return f"voxelflow.model.{model_name}"


def notify_champion(model_name: str, version: str | None) -> bool:
    """Tell the services that follow ``model_name`` (``voxelflow serve`` with a Prefect API) that its
    champion is now ``version``, so they swap it in at once instead of at their next poll. The poll stays
    their fallback: a notice that was not delivered is logged (True when it was sent) and the run goes on."""
    import logging
    import uuid

    from prefect.events import Event

    from voxelflow.core.redact import redact

    try:
        post([Event(event=CHAMPION_MOVED, resource={"prefect.resource.id": model_resource(model_name),
                                                    "voxelflow.model": model_name},
                    payload={"version": version}, id=uuid.uuid4())])
        return True
    except Exception as exc:  # noqa: BLE001 - the services notice at their next poll
        logging.getLogger(__name__).warning("the champion notice for %s was not sent (services see it at their "
                                            "next poll): %s", model_name, redact(f"{type(exc).__name__}: {exc}"))
        return False


def follow_champion(model_name: str, on_notice, stop) -> None:
    """Until ``stop`` (a threading.Event) is set, call ``on_notice(version)`` for each champion notice about
    ``model_name`` from the Prefect API's event stream, reconnecting after an error (logged once per kind).
    Runs in the calling thread: start it in one of its own."""
    import asyncio
    import logging

    from prefect.events.clients import get_events_subscriber
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    from voxelflow.core.redact import redact

    log, last = logging.getLogger(__name__), None
    wanted = EventFilter(event=EventNameFilter(name=[CHAMPION_MOVED]),
                         resource=EventResourceFilter(id=[model_resource(model_name)]))

    async def listen() -> None:
        nonlocal last
        while not stop.is_set():
            try:
                async with get_events_subscriber(filter=wanted, reconnection_attempts=0) as events:
                    last = None
                    async for event in events:
                        on_notice(event.payload.get("version"))
                        if stop.is_set():
                            return
            except Exception as exc:  # noqa: BLE001 - the poll carries on meanwhile
                reason = redact(f"{type(exc).__name__}: {exc}")[:300]
                if reason != last:
                    log.warning("champion notices for %s paused, reconnecting: %s", model_name, reason)
                last = reason
                await asyncio.sleep(2)

    asyncio.run(listen())
