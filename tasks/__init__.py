"""Prefect tasks: thin wrappers over the library's stage functions (retries, timeouts, artifacts)."""
