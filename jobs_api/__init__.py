"""Jobs API: durable asynchronous jobs that run long inference operations through the gateway.

Pure decisions: `models` (jobs and their life cycle), `attempts` (how an attempt ends), `errors`.
Around them: `handlers` (the API job types are written against) and `job_types` (the built-in
ones); `runner` (workers that claim and run jobs); `store` (SQLite and Redis backends); `auth`,
`metrics`, `config`; `routes` and `keys` (the HTTP API and its app state) wired by `app`; `cli`
(the `jobs-api` command, the only reader of the environment) and `client` (a Python client).
"""
