"""Feature flags: targeting, consistent rollouts, variants and kill switches, evaluated in process.

Flags are stored in the database, compiled into every instance's memory and
evaluated there with no network call; a change reaches every instance within a
second (Redis notification, polling fallback). The maths is Unleash's
(:meth:`FlagSet.from_unleash`), and :class:`BastionProvider` serves them through
the OpenFeature API.
"""

from bastion.flags._build import FlagsRuntime, flags_runtime
from bastion.flags._dependencies import (
    ContextBuilder,
    CurrentFlags,
    FlagContext,
    add_context_builder,
    current_flags,
    feature_required,
    flag_context,
)
from bastion.flags._engine import FlagSet
from bastion.flags._errors import (
    FlagExists,
    FlagNotFound,
    FlagVersionMismatch,
    InvalidFlag,
    SegmentInUse,
    SegmentNotFound,
    StoredFlagInvalid,
)
from bastion.flags._evaluation import Evaluation, EvaluationContext, Reason
from bastion.flags._flags import Flags
from bastion.flags._model import (
    Constraint,
    Flag,
    FlagType,
    Operator,
    Prerequisite,
    Rollout,
    Rule,
    ScheduledChange,
    Segment,
    TenantOverride,
    Variant,
    VariantOverride,
    VariantPayload,
)
from bastion.flags._provider import BastionProvider
from bastion.flags._store import FlagChange, FlagStore, ImportReport, StoredFlag, StoredSegment
from bastion.flags._unleash import (
    flags_from_unleash,
    is_unleash_export,
    is_unleash_state,
    to_unleash,
)

__all__ = [
    "BastionProvider",
    "Constraint",
    "ContextBuilder",
    "CurrentFlags",
    "Evaluation",
    "EvaluationContext",
    "Flag",
    "FlagChange",
    "FlagContext",
    "FlagExists",
    "FlagNotFound",
    "FlagSet",
    "FlagStore",
    "FlagType",
    "FlagVersionMismatch",
    "Flags",
    "FlagsRuntime",
    "ImportReport",
    "InvalidFlag",
    "Operator",
    "Prerequisite",
    "Reason",
    "Rollout",
    "Rule",
    "ScheduledChange",
    "Segment",
    "SegmentInUse",
    "SegmentNotFound",
    "StoredFlag",
    "StoredFlagInvalid",
    "StoredSegment",
    "TenantOverride",
    "Variant",
    "VariantOverride",
    "VariantPayload",
    "add_context_builder",
    "current_flags",
    "feature_required",
    "flag_context",
    "flags_from_unleash",
    "flags_runtime",
    "is_unleash_export",
    "is_unleash_state",
    "to_unleash",
]
