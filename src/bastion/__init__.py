"""Bastion: the production layer for Python ASGI services.

Example:
    >>> import bastion
    >>> from fastapi import FastAPI
    >>> app = FastAPI()
    >>> bastion.install(app)
"""

from bastion._stack import Bastion, create_app, install
from bastion.context import RequestContext, current_context
from bastion.errors import BastionError, ErrorCode
from bastion.settings import Settings

__all__ = [
    "Bastion",
    "BastionError",
    "ErrorCode",
    "RequestContext",
    "Settings",
    "create_app",
    "current_context",
    "install",
]

__version__ = "0.1.0.dev0"
