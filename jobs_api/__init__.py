"""Jobs API: durable asynchronous jobs that run long inference operations through the gateway.

Not built yet; see the project's issue tracker.
"""
