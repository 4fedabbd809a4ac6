"""A small shop on Starlette and asyncpg, raced in-process by `payrace explore --app`.

    app      the service: settings from the environment, its own `store` schema (sales,
             charges, invoices), three routes, the one capture routine; build(locked=...)
    buggy    create_app(): the charge read with a plain SELECT (the incident)
    fixed    create_app(): the same read with SELECT ... FOR UPDATE (the fix)
    payrace.toml  payrace's profile for it (docs/profile.md)

The capture routine holds two `await payrace.pause(...)` points, after the read and between
the writes; they cost nothing unless payrace's explorer drives the request (README.md).
"""
