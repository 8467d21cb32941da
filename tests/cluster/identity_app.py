"""A bastion app for the identity cluster tests: the identity routes and nothing else.

Everything comes from the environment (database, Redis, secrets, throttle), so
every instance a test starts is one deployment's.
"""

from __future__ import annotations

from fastapi import FastAPI

import bastion

app = FastAPI()
bastion.install(app)
