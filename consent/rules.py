"""Auto-approve rules of a step-up scope policy (e.g. ``amount <= 10000`` for a micro-purchase).

A rule compares one numeric field of a request's single ``authorization_details`` entry
(RFC 9396 §2) with a bound. The policy (``ScopePolicy.auto_approve_rule``) keeps the rule; the
approval service asks whether a request satisfies it, and a request that does is approved
without a prompt, audited as such.
"""

import re
from decimal import Decimal, InvalidOperation
from typing import Any

_RULE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|!=|<|>)\s*(-?\d+(?:\.\d+)?)\s*$")


def validate_rule(rule: str) -> None:
    if rule and not _RULE.match(rule):
        raise ValueError("auto-approve rule must look like 'amount <= 10000'")


def rule_matches(rule: str, details: list[dict[str, Any]]) -> bool:
    """True when the request's one entry satisfies the rule.

    Only single-entry requests are decided by a rule: several entries could split
    one large amount into small ones. A missing, non-numeric or non-finite field
    never matches.
    """
    match = _RULE.match(rule or "")
    if not match or len(details) != 1:
        return False
    field, op, bound = match.group(1), match.group(2), Decimal(match.group(3))
    for entry in details:
        try:
            value = Decimal(str(entry[field]))
        except (KeyError, InvalidOperation):
            return False
        if not value.is_finite():
            return False
        ok = {
            "<=": value <= bound,
            ">=": value >= bound,
            "<": value < bound,
            ">": value > bound,
            "==": value == bound,
            "!=": value != bound,
        }[op]
        if not ok:
            return False
    return True


# Amounts a budget counts: a plain decimal string ("4250.00"), as RFC 9396's examples write them.
_AMOUNT = re.compile(r"^\d{1,14}(?:\.\d{1,4})?$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")


def parse_amount(text: object) -> Decimal | None:
    """A positive decimal amount from a decimal string, or None (numbers, signs, exponents refused:
    a JSON number may already have lost precision as a float)."""
    if not isinstance(text, str) or not _AMOUNT.match(text):
        return None
    amount = Decimal(text)
    return amount if amount > 0 else None


def is_currency(text: object) -> bool:
    """An ISO 4217 alphabetic code ("USD")."""
    return isinstance(text, str) and bool(_CURRENCY.match(text))


def amount_of(details: list[dict[str, Any]]) -> tuple[Decimal, str] | None:
    """The request's amount and currency: the sum of its entries' ``amount`` fields, all in one
    ``currency``; None when an entry carries no countable amount or the currencies differ."""
    total, currencies = Decimal(0), set[str]()
    for entry in details:
        amount = parse_amount(entry.get("amount"))
        currency = entry.get("currency")
        if amount is None or not is_currency(currency):
            return None
        total += amount
        currencies.add(str(currency))
    if len(currencies) != 1:
        return None
    return total, currencies.pop()
