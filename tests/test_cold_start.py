"""Cold start: importing the app loads none of the heavy libraries (they load on first use)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("boto3", "botocore", "pynamodb", "psycopg", "cryptography", "moto")


def test_import_app_loads_no_heavy_module():
    code = f"import sys, app; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
