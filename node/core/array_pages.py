"""An array's listing: the page token of a position, and the position in a member's id.

Shared by the node (ListTasks of an array) and the client (`submit --wait --array`, which
reads on from the first task not seen finished instead of listing the whole array again).
"""

from __future__ import annotations

import base64
import binascii

from node.core import keys
from node.core.errors import InvalidArgument


def encode_token(array_id: str, position: int) -> str:
    """The page token that lists the array from this position (0-based) on."""
    return base64.urlsafe_b64encode(f"{array_id}:{position}".encode()).decode()


def decode_token(token: str, array_id: str) -> int:
    """The position a page token of this array's listing starts at ("" is 0). Raises
    InvalidArgument for a token of another listing."""
    if not token:
        return 0
    try:
        text = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
        owner, _, position = text.partition(":")
        if owner == array_id and position.isdigit():
            return int(position)
    except (binascii.Error, ValueError):
        pass
    raise InvalidArgument("page_token", "does not belong to this array's listing")


def member_position(task_id: str) -> int:
    """The array position a member's id carries (the inverse of keys.array_task_id's
    packing: rand_a's 12 bits, then the top of rand_b). For an id that is no member, a
    number that keys.array_task_id does not map back to that id."""
    value = int(task_id.replace("-", ""), 16)
    rest = keys.ARRAY_POSITION_BITS - 12
    rand_a = (value >> 64) & 0xFFF
    return (rand_a << rest) | ((value >> (62 - rest)) & ((1 << rest) - 1))
