"""A small app for the ``bastion migrate`` tests; its settings come from BASTION_* variables."""

from fastapi import FastAPI

import bastion


def create_app() -> FastAPI:
    app = FastAPI()
    bastion.install(app)
    return app


def create_bare_app() -> FastAPI:
    return FastAPI()
