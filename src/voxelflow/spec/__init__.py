"""The pipeline spec: its sections and settings, the user's steps, the when language, the step graph, migrations and docs."""
