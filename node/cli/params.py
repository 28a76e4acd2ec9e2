"""The CLI's own parameter types and checks: sizes, CPU amounts, KEY=VALUE, HOST:PORT."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from node.core.units import parse_cpu, parse_duration, parse_size


class _UnitParam(click.ParamType[int]):
    """A number with units, parsed by `parse` (node.core.units); an int passes through."""

    parse: Callable[[str], int]

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return self.parse(str(value))
        except ValueError as error:
            self.fail(str(error), param, ctx)


class SizeParam(_UnitParam):
    """A size like 64Mi or 1G, as bytes."""

    name = "size"
    parse = staticmethod(parse_size)


class CpuParam(_UnitParam):
    """CPU as cores (0.5) or millicores (500m), as millicores."""

    name = "cores"
    parse = staticmethod(parse_cpu)


class DurationParam(click.ParamType[float]):
    """A duration like 90s, 5m or 2h, as seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_duration(str(value))
        except ValueError as error:
            self.fail(str(error), param, ctx)


ARRAY_FORMS = "START-END[:STEP], e.g. 1-100 or 0-98:2 (END included)"


class ArrayParam(click.ParamType[tuple[int, int, int]]):
    """An array's indices START-END[:STEP], as (start, end, step)."""

    name = "range"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[int, int, int]:
        if isinstance(value, tuple):
            return value
        spelled, _, step = str(value).strip().partition(":")
        start, dash, end = spelled.partition("-")
        if not dash and start.isdigit():
            end = start     # a single index, as sbatch --array=5 means
        if not (start.isdigit() and end.isdigit() and (step.isdigit() or not step)):
            self.fail(f"{value!r} is not {ARRAY_FORMS}", param, ctx)
        return int(start), int(end), int(step or 1)


def split_retry_classes(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> list[str]:
    """--retry-on failed,oom --retry-on timeout -> ["failed", "oom", "timeout"]."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def parse_env(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", ctx, param)
        env[key] = value
    return env


def check_server(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if "://" in value:
        raise click.BadParameter(f"{value!r} is a URL; give HOST:PORT", ctx, param)
    return value
