"""`python -m gateway` runs the gateway command line."""

from gateway.cli import main

main()
