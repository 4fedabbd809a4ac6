"""`python -m examples.flask_shop [--host 127.0.0.1] [--port 8000]`: the shop, served.

werkzeug's threaded server (`make_server(..., threaded=True)`) rather than waitress: it comes
with Flask, and it gives every request a thread of its own, so racing requests reach the
flow together instead of queueing for one of waitress's four worker threads (which would
serialise a race of more than four requests before the database sees it). The database side
is a normal persistent pool (psycopg_pool, SHOP_POOL_SIZE connections at most, kept open).

Exit codes: 0 after SIGTERM or Ctrl-C; 2 for a missing or wrong SHOP_* variable; 1 when the
database does not answer within 10 s.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from types import FrameType

from psycopg_pool import ConnectionPool, PoolTimeout
from werkzeug.serving import make_server

from examples.flask_shop.app import PREFIX, create_app
from examples.flask_shop.schema import create_schema
from examples.flask_shop.settings import Settings, SettingsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.flask_shop")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as exc:
        print(f"flask_shop: {exc}", file=sys.stderr)
        return 2
    # autocommit: a read outside `conn.transaction()` never leaves a connection idle in one.
    pool = ConnectionPool(
        settings.database_url, min_size=2, max_size=settings.pool_size, open=False,
        kwargs={"autocommit": True}, name="flask_shop",
    )  # fmt: skip
    try:
        pool.open(wait=True, timeout=10)
    except PoolTimeout:
        pool.close()
        print("flask_shop: the database at SHOP_DATABASE_URL did not answer", file=sys.stderr)
        return 1
    with pool:
        create_schema(pool)
        server = make_server(args.host, args.port, create_app(settings, pool), threaded=True)
        signal.signal(signal.SIGTERM, _exit)
        url = f"http://{args.host}:{server.port}{PREFIX}"
        print(f"flask_shop ({settings.variant}) listening on {url}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    return 0


def _exit(signum: int, frame: FrameType | None) -> None:
    # Unwinds serve_forever like Ctrl-C does, so the pool's connections are closed.
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
