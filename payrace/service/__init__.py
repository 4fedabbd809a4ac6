"""The reference capture service: one target payrace races, readable in one sitting.

Reading order:

    capture.py          the capture routine: the incident's read and the fixes side by side,
                        the lock, the status checked after it, gateway, writes, commit
    command.py          what a capture is asked, its checks against the stored rows, its answer
    retry.py            serialisation failures, deadlocks, lost connections: retry, 409, 503
    app.py              FastAPI routes over the routine; `Runtime` holds what is built once
    direct.py           the JSON POST routes answered ahead of FastAPI's router (same code)
    signatures.py       Razorpay's callback and webhook signatures (the razorpay SDK)
    gateway_client.py   Razorpay's API: a lean client in the SDK's wire format (default), or
                        the razorpay SDK itself off the event loop (GATEWAY_CLIENT=sdk)
    sql.py              the capture path's asyncpg pools and transactions, their observers
    models.py, db.py    tables and the rows the capture reads; the other routes' engine, schema
    errors.py           every error as JSON {"error": {"code", "message"}}
    settings.py         environment settings
    instrument/         test-only: pause points, Server-Timing, the middleware; inert unless
                        a harness enables it
"""
