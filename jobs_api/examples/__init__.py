"""Example custom job types (enable with JOBS_HANDLERS=jobs_api.examples.pipeline)."""
