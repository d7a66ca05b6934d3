"""The lifecycle's stages and the executor of its typed step graph.

A module per built-in stage holds its logic as a plain function and its result (:mod:`.ingest`,
:mod:`.preprocess`, :mod:`.split`, :mod:`.train`, :mod:`.evaluate`, :mod:`.promote`, :mod:`.approval`,
:mod:`.deploy`), beside what they share (:mod:`.context`, :mod:`.tracking`: the MLflow run), the type
of each reference they pass on (:mod:`.references`) and the lifecycle's result (:mod:`.summary`). :mod:`~voxelflow.spec.contracts` declares each built-in stage (its
spec section, what it reads and gives, the outputs a condition may read); :mod:`~voxelflow.spec.graph`
builds the graph of a spec (built-ins and the user's ``steps``); :mod:`.execute` runs it, the same way
with no orchestrator (``voxelflow.pipeline.run``) as in the Prefect lifecycle flow, which only says how
each node runs (a task, or a flow run on a work pool); :mod:`.steps` runs one of the user's steps.
"""
