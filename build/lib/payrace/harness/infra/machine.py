"""Which machine produced a result: every summary carries it, so figures are never anonymous.

machine()   hostname, CPU count, Python version, platform
"""

from __future__ import annotations

import os
import platform
import socket
from typing import Any


def machine() -> dict[str, Any]:
    return {
        "hostname": socket.gethostname(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
