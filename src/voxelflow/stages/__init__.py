"""The lifecycle as a typed step graph.

:mod:`~voxelflow.spec.contracts` declares each built-in stage (its spec section, what it reads and
gives, the outputs a condition may read); :mod:`~voxelflow.spec.graph` builds the graph of a spec
(built-ins and the user's ``steps``); :mod:`~voxelflow.stages.execute` runs it, the same way with no
orchestrator (``voxelflow.pipeline.run``) as in the Prefect lifecycle flow, which only says how each
node runs (a task, or a flow run on a work pool).
"""
