"""payrace: prove on a real PostgreSQL that a payment is captured exactly once.

Everything payrace installs lives under this one namespace, so it can never shadow a
team's own `service`, `harness` or `tests` packages:

    payrace.pause        `await pause("after_read")`: a pause point in a team's own async
                         service, for `payrace explore --app` (payrace.pausing); a no-op
                         unless the explorer drives the request
    payrace.service      the reference capture service (the system under test)
    payrace.harness      fires the races, watches the database, judges, reports (CLI `payrace`)
    payrace.locustfiles  the same races at volume, for Locust (files, run with `locust -f`)
    payrace.testing      races in a team's own tests: capture_race() (the seed's test: the
                         callback and the webhook gathered on a fresh database), race(); the
                         pytest plugin's `race` and `arace` fixtures are built on it

Importing this package imports the standard library's contextvars and nothing else: the
pytest plugin, the CLI and a service that only pauses pay for the web framework, the ORM
and the SDK only when they use them.
"""

from payrace.pausing import pause

__version__ = "0.1.0"
__all__ = ["__version__", "pause"]
