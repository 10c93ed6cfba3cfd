"""The arms of a study and their small grammar: what each one trains, on how many tokens, how.

An arm is written ``BASE[ITEMS]@TOKENS`` (the brackets and the budget are optional, in either order):

``BASE``
    ``native`` (the original model) and ``scaled`` (the same weights with the student's RoPE, untrained)
    train nothing. ``cpt`` is next-token training on long blocks (``--cpt-seq-len``, default the target
    length). ``ard``, ``logits``, ``hidden`` and ``attention`` distil the native model on short blocks
    (``--seq-len``); several joined by ``+`` are one weighted objective (``ard+logits``). A trailing
    ``+cpt`` adds the paper's second stage: next-token training on long blocks within the same budget
    (``ard+cpt``: the first ``1 - cpt share`` of the tokens distil, the rest continue pre-training).
``ITEMS`` (comma-separated)
    ``q``, ``k``, ``v`` or ``q=0.5``: the relations ``ard`` distils, with weights (default all three);
    ``all``, ``every-other``, ``3``, ``0-11``, ``-1``: the decoder layers distilled (``hidden``
    without them distils a few layers spread over the depth); ``logits=0.1``: the weight of an
    objective in a combination; ``seeds=N``: seeds of this arm (default ``--seeds``); ``KEY=VALUE``:
    any restore setting for this arm alone (``lr=2e-4``, ``adapter=dense``, ``seq_len=1024``,
    ``cpt_tokens=1M``).
``TOKENS``
    this arm's training budget: ``0.25M``, ``500K``, ``2_000_000``, or ``25%`` of ``--max-tokens``.

Presets expand to several arms: ``default`` (native, scaled, cpt, logits, hidden, ard, ard+cpt),
``budget`` (ARD at 0.25M, 0.5M, 1M, 2M tokens and at ``--max-tokens``) and ``ablations`` (ARD on
Q/Q, K/K or V/V alone, all three, and on every other layer).

Example:
    >>> [a.name for a in parse_arms("native,ard[k,v]@0.5M,ard+cpt[seeds=2]")]
    ['native', 'ard[k,v]@0.5M', 'ard+cpt']
    >>> parse_arms("ard@25%")[0].tokens(4_000_000)
    1000000
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from linearard.config import PAPER_CPT_TOKENS, PAPER_TOKENS, coerce, field_names, parse_count
from linearard.errors import UserError

UNTRAINED = ("native", "scaled")
DISTILLATION = ("ard", "logits", "hidden", "attention")
RELATIONS = ("q", "k", "v")
LAYER_WORDS = ("all", "every-other")
PRESETS = {
    "default": ("native", "scaled", "cpt", "logits", "hidden", "ard", "ard+cpt"),
    "budget": ("ard@0.25M", "ard@0.5M", "ard@1M", "ard@2M", "ard"),
    "ablations": ("ard[q]", "ard[k]", "ard[v]", "ard", "ard[every-other]"),
}
DEFAULT_ARMS = ",".join(PRESETS["default"])
# The paper's two stages: 4.25M tokens = 2.25M of ARD + 2M of CPT (PAPER_NOTES: inferred, not stated).
PAPER_CPT_SHARE = PAPER_CPT_TOKENS / PAPER_TOKENS
# Settings the study fixes for every arm: one starting point, one RoPE, one run folder per arm.
STUDY_SETTINGS = frozenset(
    {"model", "rope_type", "rope_factor", "target_length", "output", "resume", "dry_run", "export", "eval",
     "strategy", "objective", "seed", "max_tokens"}
)

_ARM = re.compile(
    r"(?P<base>[a-z][a-z+]*)(?:\[(?P<pre>[^\[\]]*)\])?(?:@(?P<budget>[^\[\]@]+))?(?:\[(?P<post>[^\[\]]*)\])?"
)
_LAYER = re.compile(r"-?\d+(?:-\d+)?")
_BRACKETS_HINT = "write arms as BASE[ITEMS]@TOKENS, e.g. ard[k,v]@0.5M"


@dataclass(frozen=True)
class Arm:
    """One arm of a study, as parsed from its text (see the module docstring).

    ``name`` is the canonical text (items in a fixed order, the budget normalised, ``seeds=`` left out);
    it names the arm in tables and, made file-safe, its folder (``slug``).
    """

    name: str
    base: str
    objective: str | None = None  # what the first (or only) stage trains; None: no training
    terms: tuple[str, ...] = ()  # the objectives of the first stage, in order
    cpt_stage: bool = False  # a second, next-token stage on long blocks
    budget: int | None = None  # tokens; None: --max-tokens (or a share of it)
    budget_share: float | None = None  # a fraction of --max-tokens
    relations: tuple[tuple[str, float], ...] = ()
    layers: str | None = None
    weights: tuple[tuple[str, float], ...] = ()
    settings: tuple[tuple[str, Any], ...] = ()
    seeds: int | None = None
    family: str = field(default="", compare=False)  # the name without its budget (the budget curve)

    @property
    def trains(self) -> bool:
        return self.objective is not None

    @property
    def slug(self) -> str:
        return slugify(self.name)

    @property
    def has_budget(self) -> bool:
        return self.budget is not None or self.budget_share is not None

    def tokens(self, max_tokens: int) -> int:
        """This arm's token budget given the study's ``--max-tokens``."""
        if self.budget is not None:
            return self.budget
        if self.budget_share is not None:
            return max(1, round(self.budget_share * max_tokens))
        return max_tokens

    def objectives(self) -> list[str]:
        return list(self.terms)


def slugify(name: str) -> str:
    """An arm's name made file-safe: ``ard[k,v]@1M`` -> ``ard_k_v@1M``."""
    text = name.replace("[", "_").replace("]", "").replace(",", "_")
    return re.sub(r"[^A-Za-z0-9@+=.%_-]+", "_", text)


def parse_arms(text: str) -> list[Arm]:
    """Parse a comma-separated list of arms and presets (commas inside ``[...]`` belong to the arm).

    Identical arms listed twice (e.g. by two presets) are kept once.

    Raises:
        UserError: an unknown arm, item or setting; two different arms with the same name or folder.
    """
    arms: list[Arm] = []
    for part in split_arms(text):
        for item in PRESETS.get(part, (part,)):
            arm = parse_arm(item)
            same = [a for a in arms if a.name == arm.name or a.slug == arm.slug]
            if same and same[0] != arm:
                raise UserError(f"arms {same[0].name!r} and {item!r} clash (same name or folder); list one of them")
            if not same:
                arms.append(arm)
    if not arms:
        raise UserError("--arms names no arm")
    return arms


def split_arms(text: str) -> list[str]:
    """Split at commas (and whitespace) outside brackets.

    Example:
        >>> split_arms("native, ard[k,v]@1M")
        ['native', 'ard[k,v]@1M']
    """
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise UserError(f"unbalanced ']' in --arms {text!r}")
        if depth == 0 and (ch == "," or ch.isspace()):
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise UserError(f"unbalanced '[' in --arms {text!r}")
    parts.append("".join(current))
    return [p for p in parts if p]


def parse_arm(text: str) -> Arm:
    """Parse one arm (not a preset); see the module docstring for the grammar."""
    match = _ARM.fullmatch(text.strip())
    if not match:
        raise UserError(f"cannot read the arm {text!r}; {_BRACKETS_HINT}")
    if match["pre"] is not None and match["post"] is not None:
        raise UserError(f"arm {text!r} has two [...] groups; put every item in one")
    base = match["base"]
    terms, cpt_stage = _parse_base(base, text)
    objective = "+".join(terms) if terms else None
    raw_items = match["pre"] if match["pre"] is not None else match["post"]
    items = [i.strip() for i in raw_items.split(",")] if raw_items is not None else []
    if any(not i for i in items):
        raise UserError(f"arm {text!r} has an empty item in [...]")
    if objective is None and (items or match["budget"]):
        raise UserError(f"arm {base!r} trains nothing, so it takes no [...] items and no @budget")

    budget, share, budget_label = _parse_budget(match["budget"], text)
    relations, layers, weights, settings, seeds = _parse_items(items, terms, text)
    pieces = [f"{r}" if w == 1.0 else f"{r}={w:g}" for r, w in relations]
    pieces += layers
    pieces += [f"{n}={w:g}" for n, w in weights]
    pieces += [f"{k}={raw}" for k, _, raw in settings]
    family = base + (f"[{','.join(pieces)}]" if pieces else "")
    return Arm(
        name=family + (f"@{budget_label}" if budget_label else ""),
        base=base,
        objective=objective,
        terms=terms,
        cpt_stage=cpt_stage,
        budget=budget,
        budget_share=share,
        relations=tuple(relations),
        layers=",".join(layers) or None,
        weights=tuple(weights),
        settings=tuple((k, v) for k, v, _ in settings),
        seeds=seeds,
        family=family,
    )


def _parse_base(base: str, text: str) -> tuple[tuple[str, ...], bool]:
    if base in UNTRAINED:
        return (), False
    if base == "cpt":
        return ("cpt",), False
    names = base.split("+")
    cpt_stage = names[-1] == "cpt"
    first = names[:-1] if cpt_stage else names
    unknown = [n for n in first if n not in DISTILLATION]
    if unknown or not first or len(set(first)) != len(first):
        bad = unknown[0] if unknown else base
        raise UserError(
            f"unknown arm {text!r} ({bad!r}): arms are native, scaled, cpt, or {', '.join(DISTILLATION)} "
            f"joined by '+' and optionally ending in '+cpt' (the second stage); presets: {', '.join(PRESETS)}"
        )
    return tuple(first), cpt_stage


def _parse_budget(raw: str | None, text: str) -> tuple[int | None, float | None, str | None]:
    if raw is None:
        return None, None, None
    raw = raw.strip()
    if raw.endswith("%"):
        try:
            percent = float(raw[:-1])
        except ValueError:
            percent = math.nan
        if not (0 < percent <= 1000):
            raise UserError(f"arm {text!r}: the budget {raw!r} must be a percentage above 0 of --max-tokens")
        return None, percent / 100, f"{percent:g}%"
    try:
        tokens = parse_count(raw)
    except ValueError as err:
        raise UserError(f"arm {text!r}: cannot read the budget {raw!r}: {err}") from None
    if tokens < 1:
        raise UserError(f"arm {text!r}: the budget must be at least one token")
    return tokens, None, format_tokens(tokens)


def _parse_items(items: list[str], names: tuple[str, ...], text: str):
    relations: dict[str, float] = {}
    layers: list[str] = []
    weights: dict[str, float] = {}
    settings: list[tuple[str, Any, str]] = []
    seeds = None
    for item in items:
        key, sep, raw = (part.strip() for part in item.partition("="))
        if key in RELATIONS:
            if "ard" not in names:
                raise UserError(f"arm {text!r}: the relation item {item!r} needs ard among the objectives")
            relations[key] = _weight(raw, item, text) if sep else 1.0
        elif not sep and (item in LAYER_WORDS or _LAYER.fullmatch(item)):
            if not set(names) & {"ard", "attention", "hidden"}:
                raise UserError(f"arm {text!r}: the layer item {item!r} needs ard, attention or hidden")
            layers.append(item)
        elif key == "seeds" and sep:
            try:
                seeds = int(raw)
            except ValueError:
                seeds = 0
            if seeds < 1:
                raise UserError(f"arm {text!r}: seeds must be a whole number of at least 1, got {raw!r}")
        elif key in DISTILLATION or key == "cpt":
            if key not in names or not sep:
                raise UserError(f"arm {text!r}: {item!r} weighs an objective that this arm's first stage lacks")
            weights[key] = _weight(raw, item, text)
        elif sep:
            settings.append(_setting(key, raw, text))
        else:
            raise UserError(
                f"arm {text!r}: unknown item {item!r}; items are q, k, v (relations), all, every-other, 3, 0-11 "
                "(layers), OBJECTIVE=W, seeds=N, or a restore setting KEY=VALUE"
            )
    ordered = [(r, relations[r]) for r in RELATIONS if r in relations]
    return ordered, layers, sorted(weights.items()), settings, seeds


def _weight(raw: str, item: str, text: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise UserError(f"arm {text!r}: {item!r} needs a weight >= 0")
    return value


def _setting(key: str, raw: str, text: str) -> tuple[str, Any, str]:
    name = key.replace("-", "_")
    if name not in field_names():
        raise UserError(f"arm {text!r}: {key!r} is neither an item nor a restore setting")
    if name in STUDY_SETTINGS:
        raise UserError(f"arm {text!r}: {name} is set by the study for every arm and cannot change per arm")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    return name, coerce(name, value, origin=f"arm {text!r}"), raw


def format_tokens(n: int, *, exact: bool = True) -> str:
    """A token count the way budgets are written: ``250000`` -> ``0.25M``, ``1500`` -> ``1.5K``.

    `exact` (names and budgets) falls back to the plain number where the short form would not read back
    exactly; otherwise (the tokens a run trained, in reports) three significant digits: ``4227072`` -> ``4.23M``.
    """
    # (unit, its size, the smallest count written with it): 250000 reads better as 0.25M than 250K.
    for unit, size, smallest in (("M", 10**6, 10**5), ("K", 10**3, 10**3)):
        if n >= smallest:
            if not exact:
                return f"{n / size:.3g}{unit}"
            short = f"{n / size:g}{unit}"
            if parse_count(short) == n:
                return short
    return str(n)
