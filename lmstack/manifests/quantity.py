"""Memory quantities (`24Gi`, `512Mi`, `80G`, plain bytes) and durations (`20m`, `90s`, `1h30m`)."""

from __future__ import annotations

import math
import re
from fractions import Fraction

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
_DECIMAL = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
# re.ASCII: `\d` must not match other scripts' digits.
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i|[kKMGTP])?\s*$", re.ASCII)
# What people write instead (`24GB`, `24GiB`, `24gi`, `24 g`): worth a "did you mean".
_NEAR_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp])(i?)b?\s*$", re.ASCII | re.IGNORECASE)
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$", re.ASCII)
MAX_QUANTITY = 2**60  # 1024Pi: far above any GPU, far below anything that overflows a 64-bit column
MAX_DURATION = 30 * 24 * 3600  # 30 days


def parse_quantity(value: object) -> int:
    """Bytes from a Kubernetes-style quantity. Raises ValueError with a message fit for users.

    Fractions of a byte round up (`0.5Ki` is 512, `1.0001K` is 1001).
    """
    if isinstance(value, bool):
        raise ValueError("must be a memory quantity such as 24Gi or 512Mi, not a boolean")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _QUANTITY.match(value)
        if match is None:
            raise ValueError(_not_a_quantity(value))
        number, unit = match.groups()
        multiplier = _BINARY.get(unit or "") or _DECIMAL.get(unit or "") or 1
        if len(number) > 40:  # Fraction of a huge digit string is slow; it is too large anyway
            raise ValueError(f"is too large (at most {format_quantity(MAX_QUANTITY)})")
        size = math.ceil(Fraction(number) * multiplier)
    else:
        raise ValueError("must be a memory quantity such as 24Gi or 512Mi")
    if size < 0:
        raise ValueError("must not be negative")
    if size > MAX_QUANTITY:
        raise ValueError(f"is too large (at most {format_quantity(MAX_QUANTITY)})")
    return size


def _not_a_quantity(value: str) -> str:
    shown = repr(value[:40])
    near = _NEAR_QUANTITY.match(value)
    if near is not None and len(value) <= 40:
        number, letter = near.group(1), near.group(2).upper()
        return (f"{shown} is not a memory quantity: write {number}{letter}i for {number} {letter}iB "
                f"(powers of 1024) or {number}{letter} for {number} {letter}B (powers of 1000)")
    return f"{shown} is not a memory quantity (use e.g. 24Gi, 512Mi, 80G or bytes)"


def format_quantity(size: int) -> str:
    """For people: the shortest exact binary form (`24Gi`), else one decimal (`23.5Gi`)."""
    for unit in ("Pi", "Ti", "Gi", "Mi", "Ki"):
        factor = _BINARY[unit]
        if size >= factor:
            if size % factor == 0:
                return f"{size // factor}{unit}"
            return f"{size / factor:.1f}{unit}"
    return f"{size}"


def exact_quantity(size: int) -> str:
    """For storage: the shortest form that parses back to exactly `size` (`24Gi`, `1.5Gi`, `80G`, bytes)."""
    forms = [f"{size}"]
    for unit, factor in [*_BINARY.items(), *((u, f) for u, f in _DECIMAL.items() if u != "K")]:
        if size >= factor and (size * 10) % factor == 0:
            whole, tenths = divmod(size * 10 // factor, 10)
            forms.append(f"{whole}.{tenths}{unit}" if tenths else f"{whole}{unit}")
    return min(forms, key=len)  # min keeps the first of equals: bytes, then binary units


def parse_duration(value: object) -> int:
    """Seconds from `20m`, `90s`, `1h30m` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 20m or 90s, not a boolean")
    seconds: int | None = None
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and len(value) <= 40:
        match = _DURATION.match(value.strip())
        if match is not None and any(match.groups()):
            hours, minutes, secs = (int(part or 0) for part in match.groups())
            seconds = hours * 3600 + minutes * 60 + secs
    if seconds is None:
        if not isinstance(value, str):
            raise ValueError("must be a duration such as 20m or 90s")
        raise ValueError(f"{value[:40]!r} is not a duration (use e.g. 20m, 90s or 1h30m)")
    if seconds < 0:
        raise ValueError("must not be negative")
    if seconds > MAX_DURATION:
        raise ValueError(f"is too long (at most {format_duration(MAX_DURATION)})")
    return seconds


def format_duration(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs else ""]
    return "".join(parts) or "0s"
