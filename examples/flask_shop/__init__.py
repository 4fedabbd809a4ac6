"""A small payment service in another stack than payrace's reference service, to race.

    settings.py   the SHOP_* environment variables, checked (a missing one names itself)
    schema.py     shop.purchases, shop.charges, shop.bills, created on start
    flows.py      the capture twice, side by side: settle_buggy (no lock) and settle_fixed
                  (charge FOR UPDATE, state checked after the lock)
    app.py        the Flask routes under /shop/api/v1 and the razorpay SDK calls
    __main__.py   `python -m examples.flask_shop --port N`: werkzeug's threaded server
    payrace.toml  payrace's profile for this service (docs/profile.md)

README.md says how to start it and what the bug and the fix are.
"""
