"""Infrastructure: the PostgreSQL provider, the processes payrace starts and their CPU, the
readiness poller, the guardian."""
