"""Tenancy tests share the identity tests' app helpers (tests/identity/tenancy_support.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "identity"))
