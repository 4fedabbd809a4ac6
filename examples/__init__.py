"""Services written the way a team would write them, for payrace to race.

    flask_shop/   Flask + synchronous psycopg 3 with a persistent pool, routes under
                  /shop/api/v1, its own `shop` schema and Razorpay test keys, a buggy and a
                  fixed capture flow (SHOP_VARIANT)

Not part of the payrace wheel: the examples know nothing of payrace and import none of it.
"""
