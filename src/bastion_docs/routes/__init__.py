"""The ``/v1`` API of Bastion Docs, one router per resource.

Tenants, members, accounts and API keys are bastion's own routes, mounted by
``bastion.install`` under the same ``/v1`` prefix.
"""

from fastapi import APIRouter

from bastion_docs.routes import assistant, documents

__all__ = ["v1"]

v1 = APIRouter(prefix="/v1")
v1.include_router(documents.router)
v1.include_router(assistant.router)
