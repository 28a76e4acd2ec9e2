"""Running ip and nft: the one place their failures become ExecutorError."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from node.core.errors import ExecutorError

# An `ip` or `nft` call that takes longer than this is wedged (they take milliseconds).
COMMAND_TIMEOUT = 30.0


async def run(*argv: str, stdin: str = "", quiet_missing: bool = False) -> str:
    """Run ip or nft; return stdout. Raises ExecutorError with its stderr on failure.
    quiet_missing: `ip -force -batch` exits 1 when some object was gone already,
    which is what deletion wants, so only other errors count."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise ExecutorError(f"cannot run {argv[0]}: {exc} (install iproute2 and nftables)"
                            ) from exc
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin.encode()), COMMAND_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise ExecutorError(f"{argv[0]} took over {COMMAND_TIMEOUT:.0f} s") from None
    if process.returncode != 0:
        message = err.decode(errors="replace").strip()
        if quiet_missing and all(is_missing(line) for line in message.splitlines()):
            return out.decode(errors="replace")
        raise ExecutorError(f"{' '.join(argv[:3])} failed: {message}")
    return out.decode(errors="replace")


# `ip -j` dumps that links vanish from mid-way (a watchdog deleting veths, a namespace
# going away) come out cut short or empty; a fresh dump a moment later is whole.
JSON_TRIES = 3


async def run_json(*argv: str, empty: Any) -> Any:
    """run() a command that prints JSON (`ip -j`, `nft -j`) and parse it; empty output
    means `empty`. Raises ExecutorError when it fails, or prints no valid JSON in
    JSON_TRIES tries."""
    for attempt in range(JSON_TRIES):
        output = await run(*argv)
        try:
            return json.loads(output) if output.strip() else empty
        except ValueError as exc:
            if attempt == JSON_TRIES - 1:
                raise ExecutorError(f"{' '.join(argv[:4])} printed no valid JSON "
                                    f"({exc}): {output[:200]!r}") from None
            await asyncio.sleep(0.05)
    raise AssertionError("unreachable")


def is_missing(line: str) -> bool:
    """An `ip -force -batch` error line saying the object to delete is gone already."""
    return any(text in line for text in (
        "Cannot find device", "No such file or directory", "does not exist",
        "Command failed", "Cannot remove namespace"))
