"""The ``/v1`` API of Bastion Docs, one router per resource."""

from fastapi import APIRouter

from bastion_docs.routes import assistant, documents, tenants, users

__all__ = ["v1"]

v1 = APIRouter(prefix="/v1")
v1.include_router(tenants.router)
v1.include_router(users.router)
v1.include_router(documents.router)
v1.include_router(assistant.router)
