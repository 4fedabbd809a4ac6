"""`payrace bench`: what the reference service and the harness cost on one machine.

run       the command: the ceiling, the service over HTTP, their ratio, the harness, load
ceiling   the capture's statement log replayed by pgbench (PostgreSQL alone)
loadgen   the HTTP load generator, in a process of its own
"""
