"""Forced, aligned and jitter runs: configuration and gates, the target, the trials."""
