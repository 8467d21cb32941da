"""The catalogue of actions: every action bastion records, and the ones an app registers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from bastion.audit._event import ACTION_PATTERN
from bastion.audit._tables import ACTION_MAX

__all__ = ["BASTION_ACTIONS", "ActionCatalogue"]

BASTION_ACTIONS: Final[Mapping[str, str]] = {
    "auth.signup": "An account was requested (the address is verified later).",
    "auth.email.verify": "An e-mail address was verified.",
    "auth.login.success": "A login succeeded.",
    "auth.login.failure": "A login failed (unknown account, wrong password, unverified).",
    "auth.lockout": "Repeated failures locked an identifier out.",
    "auth.logout": "A session (refresh-token family) was ended.",
    "auth.logout_all": "Every session of a user was ended.",
    "auth.token.refresh": "A refresh token was exchanged for a new pair.",
    "auth.token.revoke": "A refresh-token family was revoked.",
    "auth.token.reuse_detected": (
        "A spent refresh token was presented again; its family was revoked."
    ),
    "auth.password.change": "A user changed their password.",
    "auth.password.reset_request": "A password reset was requested.",
    "auth.password.reset": "A password was reset with a reset token.",
    "auth.password.rehash": "A stored password hash was upgraded to the current parameters.",
    "auth.access_denied": "A request was refused for lack of permission.",
    "api_key.create": "An API key was created.",
    "api_key.revoke": "An API key was revoked.",
    "api_key.reject": "An unknown, revoked or expired API key was presented.",
    "member.invite": "A member was invited.",
    "member.join": "An invitation was accepted.",
    "member.role_change": "A member's role changed.",
    "member.permission_change": "A member's permissions changed.",
    "member.remove": "A member was removed from a tenant.",
    "member.invitation_revoke": "An invitation was withdrawn.",
    "tenant.create": "A tenant was created.",
    "tenant.update": "A tenant was renamed or changed.",
    "config.tenant_settings.change": "An operator changed a tenant's quotas or limits.",
    "admin.migration.apply": "Migrations were applied.",
    "admin.lockout.unlock": "An operator lifted a login lockout.",
    "flag.create": "A feature flag was created.",
    "flag.update": "A feature flag was changed.",
    "flag.toggle": "A feature flag was switched on or off.",
    "flag.delete": "A feature flag was deleted.",
    "flag.import": "A set of feature flags was imported (merged, or replacing the stored set).",
    "flag.schedule": "A feature flag's scheduled change fell due and was applied.",
    "flag.segment.update": "A flag segment (a reusable set of constraints) was created or changed.",
    "flag.segment.delete": "A flag segment was deleted.",
    "audit.checkpoint": "A signed checkpoint was made on demand.",
    "audit.prune": "Entries past retention were archived and pruned.",
    "audit.subject.erase": "A data subject's key was destroyed (crypto-shredding).",
    "audit.export": "Audit entries were exported.",
}
"""Actions bastion itself records, with what each means."""


class ActionCatalogue:
    """The actions a service may record: bastion's, plus those its app registers.

    Recording an action outside the catalogue raises ``ValueError``, so a typo
    fails in the first test that records it instead of splitting the log's vocabulary.
    """

    __slots__ = ("_actions",)

    def __init__(self, actions: Mapping[str, str] = BASTION_ACTIONS) -> None:
        self._actions: dict[str, str] = {}
        self.register(actions)

    def register(self, actions: Mapping[str, str]) -> None:
        """Add ``{action: description}``; re-registering one with another description fails.

        Raises:
            ValueError: an action is not a dotted lower-case name of at most 100
                characters, or is registered already with another description.
        """
        for action, description in actions.items():
            if len(action) > ACTION_MAX or not ACTION_PATTERN.fullmatch(action):
                raise ValueError(
                    f"audit action {action!r} is not a dotted lower-case name "
                    f"(such as 'document.update') of at most {ACTION_MAX} characters"
                )
            known = self._actions.get(action)
            if known is not None and known != description:
                raise ValueError(f"audit action {action!r} is registered with another description")
            self._actions[action] = description

    def __contains__(self, action: object) -> bool:
        return action in self._actions

    def items(self) -> list[tuple[str, str]]:
        """Every action and its description, sorted by action."""
        return sorted(self._actions.items())

    def check(self, action: str) -> None:
        """Raise ``ValueError`` unless ``action`` is in the catalogue."""
        if action not in self._actions:
            raise ValueError(
                f"audit action {action!r} is not in the catalogue: register it with "
                "audit.register_actions({...}) and document it"
            )
