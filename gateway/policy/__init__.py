"""Pure decisions of the gateway: outcome classification, latency estimates, upstream choice,
health state, retry rules and the retry budget. No I/O, clocks, event loops or global randomness:
time and randomness come in as arguments, so every rule is unit-tested without sockets."""
