"""Infrastructure: the PostgreSQL provider, the processes payrace starts, the guardian."""
