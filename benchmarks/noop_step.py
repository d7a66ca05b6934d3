"""A step that does nothing: what step_overhead adds three of to the demo lifecycle."""

from __future__ import annotations


def noop(ctx) -> None:
    return None
