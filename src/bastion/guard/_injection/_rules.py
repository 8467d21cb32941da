"""The scored rule set: one regular expression per (family, shape) over the skeleton.

Rules are written as general shapes, verbs crossed with objects and a bounded
gap between them, not as phrases of any data set: "ignore|disregard|forget …
previous|above|system … instructions|rules|context", in English, German, and a
few words of French, Spanish and Italian. Each rule has a family (the category
reported to the client) and a weight; the weights of the rules that match
combine as a noisy-or, so one strong shape or several weak ones reach the
threshold, and a lone weak word (``pretend``, ``system:``) does not.

Every rule lists *anchors*, the words a match can begin with; one scan of the
text finds where anchors occur, and a rule's expression is tried only there.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["FAMILIES", "RULES", "Rule", "RuleMatch", "match_rules"]

FAMILIES: Final = (
    "instruction_override",
    "role_play",
    "prompt_extraction",
    "delimiter_injection",
    "tool_hijack",
    "data_exfiltration",
)
"""The rule families, which are also the categories a refusal names."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One scored shape.

    Attributes:
        name: unique, for tests and debugging (never sent to clients).
        family: one of :data:`FAMILIES`.
        weight: how sure a match alone makes the detector, in (0, 1).
        pattern: compiled over the skeleton (lower case, single spaces).
        anchors: substrings one of which must occur for the pattern to run.
    """

    name: str
    family: str
    weight: float
    pattern: re.Pattern[str]
    anchors: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RuleMatch:
    """A rule that matched (its name and family, never the matched text)."""

    name: str
    family: str
    weight: float


def _gap(words: int) -> str:
    # Up to `words` intervening words, lazily: "ignore [all of] the previous instructions".
    return rf"(?:\S+\s+){{0,{words}}}?"


def _alt(*words: str) -> str:
    return "(?:" + "|".join(words) + ")"


# -- vocabulary ---------------------------------------------------------------------------------

_DISMISS_EN = _alt(
    r"ignore",
    r"ignoring",
    r"disregard\w*",
    r"drop",
    r"remove",
    r"delete",
    r"erase",
    r"wipe",
    r"leave",
    r"neglect",
    r"skip",
    r"forget(?:ting)?",
    r"overlook",
    r"override",
    r"bypass",
    r"discard",
    r"abandon",
    r"dismiss",
    r"set aside",
    r"put aside",
    r"leave behind",
    r"pay no attention to",
    r"stop following",
    r"do not follow",
    r"don'?t follow",
    r"no longer follow",
)
# A determiner alone ("ignore the warning messages") is not enough: the object must be
# qualified as earlier, the system's, or the assistant's own.
_PRIOR_EN = _alt(
    r"previous\w*",
    r"prior",
    r"preceding",
    r"above",
    r"earlier",
    r"former",
    r"initial",
    r"original",
    r"foregoing",
    r"aforementioned",
    r"system",
    r"developer",
    r"hidden",
    r"your",
    r"my",
    r"all(?: (?:of )?(?:the|your|my|these|those))?",
    r"any",
    r"every",
    r"these",
    r"those",
)
_RULES_EN = _alt(
    r"instructions?",
    r"prompts?",
    r"directives?",
    r"commands?",
    r"orders?",
    r"rules?",
    r"guidelines?",
    r"guidance",
    r"context",
    r"tasks?",
    r"assignments?",
    r"information",
    r"input",
    r"constraints?",
    r"restrictions?",
    r"programming",
    r"training",
    r"polic(?:y|ies)",
    r"safeguards?",
    r"conversation",
)
_EVERYTHING_EN = _alt(
    r"everything",
    r"all (?:of )?(?:that|this|the above|you were told|you know)",
    r"what (?:i|you|we) (?:said|told you|wrote|discussed|were told)",
    r"(?:the )?above",
    r"(?:the )?(?:text|words|lines) (?:above|before)",
    r"anything (?:said|written|mentioned) (?:before|above|earlier)",
)
_DISMISS_DE = _alt(
    r"ignorier\w*",
    r"vergiss",
    r"vergessen",
    r"vergesst",
    r"missacht\w*",
    r"überspring\w*",
    r"verwirf",
    r"verwerfen",
    r"lösch\w*",
    r"streich\w*",
    r"hinter sich lassen",
    r"hinter dir lassen",
    r"beachte\w* nicht",
    r"nicht (?:mehr )?beachten",
    r"nicht (?:mehr )?befolgen",
    r"befolge\w* nicht",
    r"außer acht",
    r"setze\w* zurück",
)
_RULES_DE = _alt(
    r"anweisung\w*",
    r"instruktion\w*",
    r"befehl\w*",
    r"regeln",
    r"vorgaben",
    r"richtlinien",
    r"aufgaben?",
    r"informationen",
    r"eingaben?",
    r"anordnung\w*",
    r"kontext",
    r"alles",
    r"prompts?",
)
_PRIOR_DE = _alt(
    r"vorherig\w*",
    r"vorig\w*",
    r"bisherig\w*",
    r"obig\w*",
    r"früher\w*",
    r"ursprünglich\w*",
    r"alle\w*",
    r"deine\w*",
    r"ihre\w*",
    r"davor",
    r"zuvor",
    r"oben",
    r"die",
    r"das",
)
_REVEAL = _alt(
    r"reveal",
    r"print",
    r"show",
    r"display",
    r"output",
    r"repeat",
    r"recite",
    r"echo",
    r"dump",
    r"leak",
    r"expose",
    r"disclose",
    r"divulge",
    r"share",
    r"tell me",
    r"give me",
    r"write (?:out|down)",
    r"copy",
    r"paste",
    r"spell out",
    r"list",
    r"return",
    r"translate",
    r"summari[sz]e",
    r"what (?:is|are|was|were)(?= (?:your|deine|ihre)\b)",
    r"zeige?\w*",
    r"gib",
    r"verrate?\w*",
    r"nenne?\w*",
    r"wiederhole?\w*",
    r"drucke?\w*",
    r"ausgeben",
)
_SECRET_PREFIX = _alt(
    r"your (?:\w+ )?",
    r"the (?:system|initial|original|hidden|secret|internal|developer|full|first|pre-?)\s?",
    r"(?:system|initial|original|hidden|secret|internal|developer)\s?",
    r"deine[nmrs]? (?:\w+ )?",
    r"ihre[nmrs]? (?:\w+ )?",
    r"(?:den|die|das) (?:system|geheim\w*|versteckt\w*|ursprünglich\w*|initial\w*)\s?",
)
_SECRET = _alt(
    r"(?:system )?prompts?",
    r"prompt[ _-]?te?xts?",
    r"instructions?",
    r"initiali[sz]ation",
    r"directives?",
    r"guidelines",
    r"rules",
    r"configuration",
    r"system message",
    r"pre-?prompt",
    r"meta[ -]?prompt",
    r"context window",
    r"hidden text",
    r"anweisungen",
    r"instruktionen",
    r"systemprompt",
    r"systemnachricht",
    r"vorgaben",
    r"regeln",
)

# -- rules ---------------------------------------------------------------------------------------

_SPECS: Final[tuple[tuple[str, str, float, str, tuple[str, ...]], ...]] = (
    # instruction override
    (
        "override.verb_object",
        "instruction_override",
        0.9,
        rf"\b{_DISMISS_EN}\s+{_gap(3)}{_PRIOR_EN}\s+{_gap(2)}{_RULES_EN}\b|"
        rf"\b{_DISMISS_EN}\s+(?:the\s+|all\s+)?(?:\S+\s+)??{_RULES_EN}\s+(?:that\s+)?"
        rf"(?:you (?:were|have been|got) (?:given|told|taught)|you received|you got|"
        rf"given (?:to you )?(?:before|earlier|above)|from before)",
        (
            "ignor",
            "disregard",
            "forget",
            "overlook",
            "overrid",
            "bypass",
            "discard",
            "abandon",
            "dismiss",
            "set aside",
            "put aside",
            "leave behind",
            "pay no",
            "stop follow",
            "do not",
            "don",
            "no longer",
        ),
    ),
    (
        "override.everything",
        "instruction_override",
        0.85,
        rf"\b{_alt('forget', 'ignore', 'disregard', 'drop', 'erase')}\s+(?:about\s+)?"
        rf"{_EVERYTHING_EN}",
        ("forget", "ignore", "disregard", "drop", "erase"),
    ),
    (
        "override.object_first",
        "instruction_override",
        0.85,
        rf"\b(?:previous|prior|preceding|above|earlier|original|initial|system)"
        rf"\s+{_gap(2)}{_RULES_EN}\s+{_gap(5)}"
        r"(?:are|is|should be|must be|can be|were)\s+(?:now\s+|all\s+|hereby\s+)?"
        r"(?:ignored|void|null|cancell?ed|revoked|obsolete|irrelevant|invalid|disregarded|"
        r"overridden|forgotten|no longer (?:valid|relevant|apply|in effect)|lifted|suspended|"
        r"outdated)",
        ("previous", "prior", "preceding", "above", "earlier", "original", "initial", "system"),
    ),
    (
        "override.new_instructions",
        "instruction_override",
        0.4,
        r"\b(?:new|updated|real|actual|true|next|different|following|additional|secret)\s+"
        r"(?:instructions?|tasks?|orders?|directives?|objective|assignment|rules?)\b\s*[:\-!]|"
        r"\b(?:from now on|starting now|henceforth|von nun an|ab (?:jetzt|sofort))\b",
        (
            "new",
            "updated",
            "real",
            "actual",
            "true",
            "next",
            "different",
            "following",
            "additional",
            "secret",
            "from now",
            "starting now",
            "henceforth",
            "von nun",
            "ab jetzt",
            "ab sofort",
        ),
    ),
    (
        "override.stop_and_say",
        "instruction_override",
        0.55,
        r"\b(?:stop|halt|stopp|achtung|attention|wait|instead|but then|however,? now|"
        r"that is enough|that's enough|well done|very good|great job|excellent|now)\b"
        r"[\s\-:!.,]+(?:\S+\s+){0,3}?"
        r"(?:just |only |simply )?(?:say|write|print|output|respond with|answer with|reply with|"
        r"tell me that|schreib\w*|sag\w*|antworte\w* mit|gib aus)\b",
        (
            "stop",
            "halt",
            "achtung",
            "attention",
            "wait",
            "instead",
            "but then",
            "however",
            "that",
            "well done",
            "very good",
            "great job",
            "excellent",
            "now",
        ),
    ),
    (
        "override.despite",
        "instruction_override",
        0.75,
        rf"\b(?:despite|regardless of|notwithstanding|contrary to|instead of following|"
        rf"disregarding|ignoring)\s+(?:what (?:you'?ve|you have|you were|you've been) (?:been )?"
        rf"(?:told|instructed|programmed)|{_PRIOR_EN}\s+{_gap(2)}{_RULES_EN}\b|"
        rf"the (?:articles?|documents?|context|sources?))|"
        rf"\babweichend (?:zu|von) (?:den |der |allen )?(?:vorherigen|bisherigen|obigen|früheren)",
        (
            "despite",
            "regardless",
            "notwithstanding",
            "contrary",
            "instead of",
            "disregarding",
            "ignoring",
            "abweichend",
        ),
    ),
    (
        "override.redefine",
        "instruction_override",
        0.7,
        r"\b(?:change|update|replace|modify|rewrite|reprogram|alter)\s+"
        r"(?:your|the assistant'?s?)\s+"
        r"(?:\w+\s+)?(?:instructions|rules|prompt|guidelines|programming|directives|task)\b|"
        r"\byour (?:new |real |only )?(?:instructions|rules|task|job|purpose|goal) "
        r"(?:are|is) now\b|"
        r"\b(?:remove|delete|erase|streiche\w*|lösche\w*) (?:\S+ ){0,4}?(?:out of|from|aus) "
        r"(?:your|deinem|ihrem|dem) (?:head|memory|mind|kopf|gedächtnis)",
        (
            "change",
            "update",
            "replace",
            "modify",
            "rewrite",
            "reprogram",
            "alter",
            "your",
            "remove",
            "delete",
            "erase",
            "streiche",
            "lösche",
        ),
    ),
    (
        "override.task_switch",
        "instruction_override",
        0.55,
        r"\b(?:now|nun|jetzt)\s+(?:\S+\s+){0,3}?(?:new|further|another|next|different|"
        r"weitere\w*|neue\w*|andere\w*)\s+(?:tasks?|challenges?|instructions?|assignments?|"
        r"aufgaben?|anweisungen|herausforderung\w*)\b|"
        r"\b(?:that is|that's|das ist|das) (?:enough|genug|genügt|erledigt)\b[.!]?\s+"
        r"(?:\S+\s+){0,2}?"
        r"(?:now|nun|jetzt)\b",
        ("now", "nun", "jetzt", "that", "das"),
    ),
    (
        "override.forced_output",
        "instruction_override",
        0.45,
        r"\brepeat after me\b|\bsprich mir nach\b|"
        r"\b(?:do not|don't) answer (?:this|the|my) question\b|"
        r"\b(?:just|only|simply) (?:say|output|print|write|respond with|answer with|"
        r"reply with)\s*[:\"']|"
        r"\b(?:say|state|claim|write|print|output|include) (?:\S+\s+){0,2}?"
        r"that you (?:hate|love|are|support)\b|"
        r"\b(?:attention|achtung|stop|stopp|warning)\s*[-!:]+\s*(?:stop|stopp|attention|achtung)\b",
        (
            "repeat after",
            "sprich mir",
            "do not",
            "don't",
            "just",
            "only",
            "simply",
            "say",
            "state",
            "claim",
            "write",
            "print",
            "output",
            "include",
            "attention",
            "achtung",
            "stop",
            "warning",
        ),
    ),
    (
        "override.ignore_context",
        "instruction_override",
        0.45,
        r"\b(?:do not|don't|without|not)\s+(?:look(?:ing)? (?:in|at|into)|us(?:e|ing)|read(?:ing)?|"
        r"consult(?:ing)?|rely(?:ing)? on|by)\s+(?:the|your|any)\s+(?:provided\s+|given\s+)?"
        r"(?:documents?|articles?|context|sources?|search results)\b",
        ("do not", "don't", "without", "not"),
    ),
    (
        "override.de_verb_object",
        "instruction_override",
        0.9,
        rf"\b{_DISMISS_DE}\s+{_gap(4)}{_PRIOR_DE}\s+{_gap(3)}{_RULES_DE}\b|"
        rf"\b{_PRIOR_DE}\s+{_gap(3)}{_RULES_DE}\s+{_gap(4)}{_DISMISS_DE}|"
        rf"\b{_alt('vergiss', 'vergessen sie', 'ignoriere', 'ignorieren sie')}\s+"
        rf"{_alt('alles', 'das alles', 'alle', 'was')}\b",
        (
            "ignorier",
            "vergiss",
            "vergess",
            "missacht",
            "übersprin",
            "verwirf",
            "verwerf",
            "lösch",
            "hinter",
            "beachte",
            "nicht",
            "befolg",
            "außer",
            "setze",
            "vorherig",
            "vorig",
            "bisherig",
            "obig",
            "früher",
            "ursprünglich",
            "alle",
            "deine",
            "ihre",
            "davor",
            "zuvor",
            "oben",
            "die",
            "das",
        ),
    ),
    (
        "override.de_object_void",
        "instruction_override",
        0.8,
        r"\b(?:alle|sämtliche|die)\s+(?:bisherigen|vorherigen|obigen|vorigen|früheren)"
        rf"\s+{_gap(5)}{_alt('sind', 'ist', 'werden')}\s+(?:\S+\s+){{0,2}}?"
        r"(?:irrelevant|ungültig|aufgehoben|hinfällig|nichtig|egal|vergessen|unwichtig|"
        r"nicht (?:mehr )?(?:gültig|relevant|wichtig))",
        ("alle", "sämtliche", "die"),
    ),
    (
        "override.romance",
        "instruction_override",
        0.85,
        r"\b(?:oubli\w*|ignor\w*|olvid\w*|dimentic\w*|esquec\w*|zaboravi\w*|zanemari\w*|"
        r"vergeet|negeer)\s+(?:\S+\s+){0,3}?"
        r"(?:instructions?|consignes|instrucciones|istruzioni|instruções|r[èe]gles|reglas|regole|"
        r"indicaciones|instrukcije|upute|instructies|regels|tout|todo|tutto|tudo|sve|alles)\b",
        (
            "oubli",
            "ignor",
            "olvid",
            "dimentic",
            "esquec",
            "zaboravi",
            "zanemari",
            "vergeet",
            "negeer",
        ),
    ),
    # role play / persona switch
    (
        "persona.now_you_are",
        "role_play",
        0.6,
        r"\b(?:now|from now on|okay,? now|ok,? now)\s+you(?: are|'re| will be| shall be)\s+"
        r"(?:\S+\s+){0,1}?"
        r"(?:a|an|the|my|[a-z]+ (?:[a-z]+ )?(?:,|\.))|\b(?:jetzt|nun|ab jetzt) bist du\b|"
        r"\b(?:stay|stays|remain|remains|always stay|bleib\w*)\s+(?:\S+\s+){0,3}?(?:in|im)\s+"
        r"(?:their|your|his|her|the|ihren|deiner|ihrer|der)\s+(?:roles?|rollen?|character|figur)\b|"
        r"\b(?:absorbed in|fully in|vollkommen in|voll in) (?:your|his|her|their|deiner|ihrer) "
        r"(?:role|rolle)\b|\brole-?playing as\b|\b(?:hypothetical|theoretical|fictional) "
        r"(?:world|scenario|universe)\b(?:\S*\s+){0,8}?(?:you are|you would|no rules)",
        (
            "now",
            "from now",
            "okay",
            "ok",
            "jetzt",
            "nun",
            "ab jetzt",
            "stay",
            "remain",
            "always",
            "bleib",
            "absorbed",
            "fully",
            "vollkommen",
            "voll",
            "role",
            "hypothetical",
            "theoretical",
            "fictional",
        ),
    ),
    (
        "persona.pwned",
        "role_play",
        0.5,
        r"\b(?:i have been |i've been )?pwn(?:ed|d)\b",
        ("i have", "i've", "pwn"),
    ),
    (
        "persona.you_are_now",
        "role_play",
        0.6,
        r"\b(?:you are|you're|you will be|you will act as|you shall be|du bist|sie sind)\s+"
        r"(?:now|no longer|not|from now on|henceforth|jetzt|nun|ab jetzt|nicht mehr|keine?)\b",
        ("you are", "you're", "you will", "you shall", "du bist", "sie sind"),
    ),
    (
        "persona.act_as",
        "role_play",
        0.4,
        r"\b(?:act|acting|behave|respond|answer|speak|talk|reply|function|serve|pose)\s+"
        r"(?:\S+\s+){0,2}?(?:as if|as though|like|as)\s+(?:a|an|the|my|if|though|you are)\b|"
        r"\b(?:fungier\w*|agier\w*|verhalte\w*|tu so|tue so),?\s+(?:\S+\s+){0,4}?(?:als|wie)\b",
        (
            "act",
            "behave",
            "respond",
            "answer",
            "speak",
            "talk",
            "reply",
            "function",
            "serve",
            "pose",
            "fungier",
            "agier",
            "verhalte",
            "tu so",
            "tue so",
        ),
    ),
    (
        "persona.i_want_you_to",
        "role_play",
        0.45,
        r"\bi (?:want|need|would like) you to (?:act|be|become|pretend|play|roleplay|imagine|"
        r"simulate|behave|respond)\b|"
        r"\bich (?:möchte|will|hätte gern),? dass (?:du|sie) (?:\S+\s+){0,5}?"
        r"(?:fungier|agier|spiel|bist|sind|vorgeb)",
        ("i want", "i need", "i would", "ich"),
    ),
    (
        "persona.pretend",
        "role_play",
        0.4,
        r"\b(?:pretend|imagine|suppose|assume|let's say|roleplay|role-play|role play|simulate|"
        r"play the role|take on the role|take the role|stell dir vor|stellen sie sich vor|"
        r"spiel\w* die rolle|tu so als)\b\s+(?:\S+\s+){0,3}?"
        r"(?:you are|you're|to be|you were|that you|you can|you could|you have|you know|as|of|"
        r"du bist|du wärst|sie sind|sie wären|"
        r"a (?:\w+ )?(?:ai|bot|model|assistant|character|persona) (?:that|who|which|without))\b",
        (
            "pretend",
            "imagine",
            "suppose",
            "assume",
            "let's say",
            "role",
            "simulate",
            "play the",
            "take",
            "stell",
            "spiel",
            "tu so",
        ),
    ),
    (
        "persona.jailbreak",
        "role_play",
        0.9,
        r"\b(?:dan|stan|dude|aim|evil ?bot|devmode)\b\s*(?:mode|\(|,|:|which stands for)|"
        r"\bdo anything now\b|\b(?:enable|activate|enter|switch to|in) (?:the )?"
        r"(?:developer|god|jailbreak|dan|unrestricted) mode\b|"
        r"\bunfiltered (?:ai|mode|model|assistant|response)|\bunrestricted (?:ai|mode|model)|"
        r"\b(?:no|without|free of|ignore|break free of|bypass) (?:any |all )?(?:ethical|moral|"
        r"content|safety|openai|usage)? ?(?:restrictions|filters|limitations|guidelines|policies|"
        r"censorship|boundaries)\b|"
        r"\b(?:you|du) (?:are|bist) (?:jailbroken|unrestricted|unfiltered)",
        (
            "dan",
            "stan",
            "dude",
            "aim",
            "evil",
            "devmode",
            "do anything",
            "enable",
            "activate",
            "enter",
            "switch to",
            "in ",
            "unfiltered",
            "unrestricted",
            "no ",
            "without",
            "free of",
            "ignore",
            "break",
            "bypass",
            "you",
            "du",
        ),
    ),
    (
        "persona.jailbreak_words",
        "role_play",
        0.4,
        r"\bjail ?break(?:ed|ing)?\b|\bdeveloper mode\b|\bgod mode\b|\bstay in character\b|"
        r"\bbreak(?:ing)? character\b|\bno (?:rules|limits)\b|"
        r"\bohne (?:jegliche |alle |irgendwelche )?"
        r"(?:regeln|einschränkungen|filter|grenzen|zensur)\b",
        ("jail", "developer mode", "god mode", "stay in", "break", "no ", "ohne"),
    ),
    # system-prompt extraction
    (
        "extraction.reveal_prompt",
        "prompt_extraction",
        0.85,
        rf"\b{_REVEAL}\s+(?:me\s+|us\s+|mir\s+|uns\s+)?(?:\S+\s+){{0,2}}?{_SECRET_PREFIX}{_SECRET}\b",
        (
            "reveal",
            "print",
            "show",
            "display",
            "output",
            "repeat",
            "recite",
            "echo",
            "dump",
            "leak",
            "expose",
            "disclose",
            "divulge",
            "share",
            "tell me",
            "give me",
            "write",
            "copy",
            "paste",
            "spell",
            "list",
            "return",
            "translate",
            "summar",
            "what",
            "zeig",
            "gib",
            "verrat",
            "nenn",
            "wiederhol",
            "druck",
            "ausgeben",
        ),
    ),
    (
        "extraction.text_above",
        "prompt_extraction",
        0.7,
        r"\b(?:repeat|print|output|recite|copy|return|write)\s+(?:\S+\s+){0,3}?"
        r"(?:text|words|content|everything|lines?|messages?|tokens)\s+(?:\S+\s+){0,2}?"
        r"(?:above|before|preceding|prior|so far|verbatim|at the (?:start|beginning))\b|"
        r"\bwhat (?:was|is) (?:written|said|stated) (?:above|before (?:this|my))|"
        r"\b(?:starting|beginning) with (?:\"|')?you are\b|\bverbatim\b",
        (
            "repeat",
            "print",
            "output",
            "recite",
            "copy",
            "return",
            "write",
            "what was",
            "what is",
            "starting with",
            "beginning with",
            "verbatim",
        ),
    ),
    (
        "extraction.before_text",
        "prompt_extraction",
        0.6,
        r"\b(?:sentences?|words?|text|lines?|paragraphs?|characters)\s+"
        r"(?:before|above|preceding)\s+"
        r"(?:the|this|my)\s+(?:text|prompt|message|question|input)\b|"
        r"\b(?:beginning|start|top) of (?:this|the|your) (?:prompt|conversation|instructions)\b|"
        r"\b(?:reveal|tell me|give me|spell|print|what is|what's) (?:the|your) "
        r"(?:secret |hidden )?(?:password|passphrase|secret key|secret word|api key)\b",
        (
            "sentence",
            "word",
            "text",
            "line",
            "paragraph",
            "character",
            "beginning",
            "start",
            "top",
            "reveal",
            "tell me",
            "give me",
            "spell",
            "print",
            "what is",
            "what's",
        ),
    ),
    # delimiter and markup injection
    (
        "delimiter.chat_markup",
        "delimiter_injection",
        0.85,
        r"<\|?\s*(?:im_start|im_end|im_sep|endoftext|system|assistant|user|eot_id|start_header_id|"
        r"end_header_id|begin_of_text)\s*\|?>|\[/?inst\]|<</?sys>>|"
        r"</?\s*(?:system|system_prompt|sys|instructions?|assistant|developer|im_start)\s*>",
        ("<", "[inst]", "[/inst]"),
    ),
    (
        "delimiter.headings",
        "delimiter_injection",
        0.6,
        r"(?:#{2,}|={3,}|-{3,}|\*{3,})\s*(?:new\s+|system\s+|updated\s+)?"
        r"(?:instructions?|system(?: prompt| message)?|admin|developer|response|assistant|"
        r"end of (?:prompt|input|context|document|instructions))\b|"
        r"\b(?:end|begin|start) of (?:the )?(?:system )?(?:prompt|instructions|user input|context|"
        r"document)\b\s*[-=#\]\)>:]|"
        r"\b(?:begin|start)(?:ning)? (?:of )?(?:new|updated|system|admin) "
        r"(?:instructions|prompt)\b",
        ("##", "===", "---", "***", "end", "begin", "start"),
    ),
    (
        "delimiter.json_role",
        "delimiter_injection",
        0.75,
        r"[\"']role[\"']\s*:\s*[\"'](?:system|developer|assistant|tool)[\"']|"
        r"\b(?:system|assistant|developer)\s*:\s*(?:you|ignore|new|from now|"
        r"the user|always|never|override|du|ignoriere)\b",
        ('"role', "'role", "system", "assistant", "developer"),
    ),
    # tool / function-call hijack
    (
        "tool.call_function",
        "tool_hijack",
        0.4,
        r"\b(?:call|invoke|trigger|run|execute|use|fire)\s+(?:\S+\s+){0,2}?"
        r"(?:the |your |this |following )?(?:function|tool|plugin|api|action|webhook|command)s?\b"
        r"\s+(?:\S+\s+){0,3}?(?:with|to|named|called|that|and|:|`|\")|"
        r"\b(?:execute|run|eval(?:uate)?)\s+(?:the following|this|these)\s+(?:\S+\s+){0,2}?"
        r"(?:code|command|script|shell|sql|query|python)\b|"
        r"\b(?:act|behave|function)\s+as\s+(?:a|an)\s+(?:\w+\s+)?(?:interpreter|terminal|shell|"
        r"console|compiler)\b",
        (
            "call",
            "invoke",
            "trigger",
            "run",
            "execute",
            "use",
            "fire",
            "eval",
            "act",
            "behave",
            "function",
        ),
    ),
    (
        "tool.call_named",
        "tool_hijack",
        0.6,
        r"\b(?:call|invoke|trigger|execute|run|use|fire)\s+(?:the\s+|your\s+)?"
        r"(?:function|tool|api|"
        r"plugin|action|command)\s+`?[a-z][\w.]*(?:_[\w.]+|\()",
        ("call", "invoke", "trigger", "execute", "run", "use", "fire"),
    ),
    (
        "tool.fake_call_json",
        "tool_hijack",
        0.75,
        r"[\"'](?:function_call|tool_calls?|tool_use|tool_code|function)[\"']\s*:|"
        r"[\"']name[\"']\s*:\s*[\"'][\w.\-]+[\"']\s*,\s*[\"'](?:arguments|parameters|args|input)"
        r"[\"']\s*:|<(?:tool_call|function_call|function_calls|invoke)\b",
        (
            '"function',
            "'function",
            '"tool',
            "'tool",
            '"name',
            "'name",
            "<tool_call",
            "<function_call",
            "<invoke",
        ),
    ),
    (
        "tool.dangerous_command",
        "tool_hijack",
        0.6,
        r"\brm\s+-rf\b|\bcurl\s+\S+\s*\|\s*(?:ba|z)?sh\b|\bwget\s+\S+\s*(?:\||;|&&)|"
        r"\bdrop\s+table\b|\bos\.system\(|\bsubprocess\.|\b__import__\(|\beval\(|\bexec\(",
        ("rm", "curl", "wget", "drop", "os.system", "subprocess", "__import__", "eval(", "exec("),
    ),
    # data exfiltration via links or images
    (
        "exfil.markdown_image",
        "data_exfiltration",
        0.75,
        r"!\[[^\]]{0,200}\]\(\s*(?:https?:)?//[^)\s]{1,400}\?[^)\s]{0,400}=|"
        r"<img\b[^>]{0,200}\bsrc\s*=\s*[\"']?(?:https?:)?//[^\s\"'>]{1,400}\?[^\s\"'>]{0,400}=",
        ("![", "<img"),
    ),
    (
        "exfil.send_to",
        "data_exfiltration",
        0.7,
        r"\b(?:send|post|upload|forward|transmit|exfiltrate|leak|e-?mail|submit|sende\w*|"
        r"schick\w*)\s+(?:\S+\s+){0,8}?(?:to|an|at|via)\s+"
        r"(?:https?://|www\.|[\w.+-]+@[\w-]+\.\w+)",
        (
            "send",
            "post",
            "upload",
            "forward",
            "transmit",
            "exfiltrat",
            "leak",
            "e-mail",
            "email",
            "submit",
            "schick",
        ),
    ),
    (
        "exfil.encode_in_url",
        "data_exfiltration",
        0.55,
        r"\b(?:append|include|encode|embed|add|put|insert|place)\s+(?:\S+\s+){0,6}?"
        r"(?:in|into|to|as)\s+(?:the\s+|a\s+|this\s+)?(?:url|link|query string|query parameters?|"
        r"image url|image link|image source|src)\b(?!\s+(?:of|to|for) (?:the |our )?(?:faq|docs|"
        r"documentation|page|website|site))",
        ("append", "include", "encode", "embed", "add", "put", "insert", "place"),
    ),
    (
        "exfil.conversation_data",
        "data_exfiltration",
        0.55,
        r"\b(?:conversation|chat history|previous messages|user'?s? (?:data|messages|emails?|"
        r"password|credentials|api key|tokens?)|api keys?|passwords?|credentials|secrets?|"
        r"session tokens?|cookies?)\b\s+(?:\S+\s+){0,6}?(?:to|into)\s+(?:\S+\s+){0,2}?"
        r"(?:https?://|the (?:url|link|image)|this (?:url|link))",
        (
            "conversation",
            "chat history",
            "previous messages",
            "user",
            "api key",
            "password",
            "credentials",
            "secret",
            "session",
            "cookie",
        ),
    ),
)

RULES: Final[tuple[Rule, ...]] = tuple(
    Rule(name, family, weight, re.compile(pattern), anchors)
    for name, family, weight, pattern, anchors in _SPECS
)
"""The rule set, in the order it is tried."""


def _trie(words: list[str]) -> str:
    """An alternation of ``words`` as a prefix tree (``a(?:ct|ssume)``...).

    ``re`` tries the branches of an alternation one by one at every position; as a
    tree, a position costs a few character tests instead of one per anchor.
    """
    tree: dict[str, Any] = {}
    for word in words:
        node = tree
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def render(node: dict[str, Any]) -> str:
        branches = [re.escape(char) + render(child) for char, child in sorted(node.items()) if char]
        optional = "" in node
        if not branches:
            return ""
        body = (
            branches[0] if len(branches) == 1 and not optional else "(?:" + "|".join(branches) + ")"
        )
        if optional:
            return f"(?:{body[3:-1] if body.startswith('(?:') else body})?"
        return body

    return render(tree)


def _index(
    rules: tuple[Rule, ...],
) -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str], dict[str, tuple[int, ...]]]:
    words: set[str] = set()
    others: set[str] = set()
    for rule in rules:
        for anchor in rule.anchors:
            (words if anchor[0].isalnum() else others).add(anchor)
    anchors = words | others
    # The scan captures the longest anchor at a position; the rules of every anchor
    # that is a prefix of it ("no " of "no longer") are tried there too.
    by_anchor = {
        anchor: tuple(
            number
            for number, rule in enumerate(rules)
            if any(anchor.startswith(own) for own in rule.anchors if own in anchors)
        )
        for anchor in anchors
    }
    # A word anchor starts a word: after a space (the skeleton has single spaces, and
    # the scan reads " " + text) or after an opening quote or bracket. Each pattern
    # begins with a literal or a character set, which ``re`` skips to at C speed; a
    # pattern that begins with a look-behind is tried at every position (3x slower,
    # measured). The look-ahead does not consume the word, so "now" in "from now on"
    # is found as well as "from now".
    trie = _trie(sorted(words))
    after_space = re.compile(rf" (?=({trie}))")
    after_punctuation = re.compile(rf"[\"'(\[{{<*`/](?=({trie}))")
    symbols = re.compile(f"({_trie(sorted(others))})")
    return after_space, after_punctuation, symbols, by_anchor


_AFTER_SPACE, _AFTER_PUNCTUATION, _SYMBOLS, _BY_ANCHOR = _index(RULES)
_ORDER: Final = {rule.name: number for number, rule in enumerate(RULES)}


def match_rules(folded: str) -> list[RuleMatch]:
    """The rules that match ``folded`` (a skeleton: lower case, single spaces).

    One scan finds every position where some rule's anchor (a word a match can begin
    with) occurs; only the rules of that anchor are tried there, with ``match``. A
    screening of 4 KB of benign text is then one regular-expression pass and some
    anchored attempts, instead of a search per rule over the whole text.
    """
    matched: set[int] = set()
    found: list[RuleMatch] = []
    by_anchor = _BY_ANCHOR
    spaced = " " + folded
    hits = itertools.chain(
        ((hit.group(1), hit.end()) for hit in _AFTER_SPACE.finditer(spaced)),
        ((hit.group(1), hit.end()) for hit in _AFTER_PUNCTUATION.finditer(spaced)),
        ((hit.group(1), hit.start()) for hit in _SYMBOLS.finditer(spaced)),
    )
    for anchor, position in hits:
        for number in by_anchor[anchor]:
            if number in matched:
                continue
            rule = RULES[number]
            if rule.pattern.match(spaced, position) is not None:
                matched.add(number)
                found.append(RuleMatch(rule.name, rule.family, rule.weight))
    found.sort(key=lambda match: _ORDER[match.name])
    return found
