"""`python -m jobs_api` runs the jobs-api command line."""

from jobs_api.cli import main

main()
