"""Human-friendly sizes and CPU amounts, in the Kubernetes spelling operators already know.

Sizes: a whole or decimal number, optionally followed by a binary suffix (Ki Mi Gi Ti,
powers of 1024) or a decimal one (k or K, M, G, T: powers of 1000), optionally followed
by B. CPU: cores ("0.5", "2") or millicores ("500m").
"""

from __future__ import annotations

import re
from decimal import ROUND_CEILING, Decimal

SIZE_FORMS = "a positive size like 1048576, 512k, 64Mi or 1G (suffixes Ki Mi Gi Ti, k M G T)"
CPU_FORMS = "a positive CPU amount in cores (0.5, 2) or millicores (500m)"

# 1 PiB: far past any machine's memory, so anything larger is a typo, not a request.
MAX_SIZE = 2**50
# Matches the ceiling node.core.config puts on a node's cpus.
MAX_CPU_CORES = 4096

_SIZE_MULTIPLIERS = {
    "": 1,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}
# Largest first, so format_size picks the biggest unit that fits.
_BINARY_UNITS = (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10))

_SIZE_PATTERN = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<suffix>[KMGT]i|[kKMGT])?B?")
_CPU_PATTERN = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<milli>m)?")


def parse_size(text: str) -> int:
    """Return the number of bytes text spells; a fraction of a byte rounds up.

    Raises ValueError, naming the accepted forms, for junk, zero, negatives
    and anything past 1 PiB.
    """
    match = _SIZE_PATTERN.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not {SIZE_FORMS}")
    multiplier = _SIZE_MULTIPLIERS[match["suffix"] or ""]
    size = int((Decimal(match["number"]) * multiplier).to_integral_value(ROUND_CEILING))
    if size <= 0:
        raise ValueError(f"{text!r} is zero; give {SIZE_FORMS}")
    if size > MAX_SIZE:
        raise ValueError(f"{text!r} is larger than 1Pi (1 PiB); give {SIZE_FORMS}")
    return size


def format_size(size: int) -> str:
    """Spell a byte count the way parse_size reads it: 67108864 -> "64Mi".

    Exact multiples get a whole number; anything else gets one decimal of the largest unit
    that fits ("1.5Gi"), which is for reading, not an exact round trip.
    """
    if size < 0:
        return "-" + format_size(-size)
    for suffix, multiplier in _BINARY_UNITS:
        if size >= multiplier:
            if size % multiplier == 0:
                return f"{size // multiplier}{suffix}"
            return f"{size / multiplier:.1f}{suffix}"
    return str(size)


def parse_cpu(text: str) -> int:
    """Return the millicores text spells: "0.5" -> 500, "2" -> 2000, "500m" -> 500.

    Raises ValueError, naming the accepted forms, for junk, zero or less, amounts finer
    than one millicore and anything past 4096 cores.
    """
    match = _CPU_PATTERN.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not {CPU_FORMS}")
    millis = Decimal(match["number"]) * (1 if match["milli"] else 1000)
    if millis != millis.to_integral_value():
        raise ValueError(f"{text!r} is finer than 1m (0.001 cores)")
    if millis <= 0:
        raise ValueError(f"{text!r} is zero; give {CPU_FORMS}")
    if millis > MAX_CPU_CORES * 1000:
        raise ValueError(f"{text!r} is more than {MAX_CPU_CORES} cores")
    return int(millis)


def format_cpu(millis: int) -> str:
    """Spell millicores as cores, as short as exact: 500 -> "0.5", 2000 -> "2"."""
    cores, remainder = divmod(millis, 1000)
    if remainder == 0:
        return str(cores)
    return f"{millis / 1000:.3f}".rstrip("0")


DURATION_FORMS = "a duration like 90s, 5m, 2h or 1h30m (a plain number is seconds)"

# 30 days: a time limit or back-off longer than that is a unit mistake, not a plan.
MAX_DURATION_SECONDS = 30 * 86400

_DURATION_PART = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<unit>ms|s|m|h|d)")
_DURATION_UNITS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60),
                   "h": Decimal(3600), "d": Decimal(86400)}


def parse_duration(text: str, *, allow_zero: bool = False,
                   max_seconds: float = MAX_DURATION_SECONDS) -> float:
    """Return the seconds text spells: "90s" -> 90, "5m" -> 300, "1h30m" -> 5400, "2.5" -> 2.5.

    Raises ValueError, naming the accepted forms, for junk, zero (unless allow_zero) and
    anything past max_seconds (30 days unless told).
    """
    spelled = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", spelled):
        seconds = Decimal(spelled)
    else:
        parts = list(_DURATION_PART.finditer(spelled))
        if not parts or "".join(part.group(0) for part in parts) != spelled:
            raise ValueError(f"{text!r} is not {DURATION_FORMS}")
        seconds = sum((Decimal(part["number"]) * _DURATION_UNITS[part["unit"]]
                       for part in parts), Decimal(0))
    if seconds <= 0 and not allow_zero:
        raise ValueError(f"{text!r} is zero; give {DURATION_FORMS}")
    if seconds > max_seconds:
        raise ValueError(f"{text!r} is longer than {_spelled_days(max_seconds)}")
    return float(seconds)


def _spelled_days(seconds: float) -> str:
    """30 days -> "30 days", 365 days -> "a year"."""
    days = seconds / 86400
    return "a year" if days == 365 else f"{days:g} days"


def format_seconds(seconds: float) -> str:
    """Spell a duration the way parse_duration reads it: 5400 -> "1h30m", 2.5 -> "2.5s"."""
    if seconds != int(seconds) or seconds < 60:
        return f"{seconds:g}s"
    whole = int(seconds)
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, whole = divmod(whole, size)
        if count:
            out += f"{count}{unit}"
    return out
