"""The harness: fires interleaved requests at a target, watches its database, judges, reports."""
