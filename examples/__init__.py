"""Services written the way a team would write them, for payrace to race.

    flask_shop/      Flask + synchronous psycopg 3 with a persistent pool, routes under
                     /shop/api/v1, its own `shop` schema and Razorpay test keys, a buggy and a
                     fixed capture flow (SHOP_VARIANT); raced over HTTP, knows nothing of
                     payrace and imports none of it
    starlette_shop/  Starlette + asyncpg, its own `store` schema, a buggy and a fixed capture
                     flow with `await payrace.pause(...)` points (its one import of payrace);
                     raced in-process by `payrace explore --app`

Not part of the payrace wheel.
"""
