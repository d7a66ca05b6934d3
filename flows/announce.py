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


def event_for(event: str, pipeline: str, payload: dict[str, Any], event_id: UUID):
    """The Prefect event ``event`` about ``pipeline`` (resource ``voxelflow.dataset.<pipeline>``). It names no
    related flow run: with one, the server was seen to take seconds longer to start the triggered run."""
    from prefect.events import Event

    return Event(event=event, resource={"prefect.resource.id": resource_id(pipeline), "voxelflow.pipeline": pipeline},
                 payload=payload, id=event_id)


def post(events: list) -> None:
    """POST ``events`` to the Prefect API's ``/events``: it answers once they were published to the server's
    event bus (triggers and storage); an error status or no answer raises."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.request("POST", "/events", json=[e.model_dump(mode="json") for e in events])


def send(event: str, pipeline: str, payload: dict[str, Any], event_id: UUID) -> None:
    """Send one event and wait until the Prefect API accepted it; raise when it was not delivered."""
    post([event_for(event, pipeline, payload, event_id)])
