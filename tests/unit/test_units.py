"""Sizes and CPU amounts as users type them on the command line."""

from __future__ import annotations

import pytest

from node.core.units import (
    format_cpu,
    format_seconds,
    format_size,
    parse_cpu,
    parse_duration,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1048576),
        ("512", 512),
        ("512B", 512),
        ("512k", 512_000),
        ("512K", 512_000),
        ("1G", 10**9),
        ("2M", 2 * 10**6),
        ("1T", 10**12),
        ("64Ki", 64 * 1024),
        ("64Mi", 64 * 2**20),
        ("64MiB", 64 * 2**20),
        ("4Gi", 4 * 2**30),
        ("1Ti", 2**40),
        ("1.5Gi", 3 * 2**29),
        ("1GB", 10**9),
        (" 64Mi ", 64 * 2**20),
        ("1024Ti", 2**50),
    ],
)
def test_parse_size_reads_binary_and_decimal_suffixes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_rounds_a_fraction_of_a_byte_up() -> None:
    assert parse_size("1.5") == 2


@pytest.mark.parametrize(
    "text", ["", "12Q", "-1", "-64Mi", "0", "0Mi", "Mi", "64 Mi B x", "1e6", "64mi", "64m", "1.",
             "1025Ti", "abc"])
def test_parse_size_rejects_junk_and_says_what_it_accepts(text: str) -> None:
    with pytest.raises(ValueError, match="64Mi"):
        parse_size(text)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, "0"),
        (512, "512"),
        (1024, "1Ki"),
        (64 * 2**20, "64Mi"),
        (1536 * 2**20, "1.5Gi"),
        (4 * 2**30, "4Gi"),
        (2**40, "1Ti"),
        (10**9, "953.7Mi"),
    ],
)
def test_format_size_picks_the_largest_exact_unit(size: int, expected: str) -> None:
    assert format_size(size) == expected


@pytest.mark.parametrize("size", [1024, 64 * 2**20, 3 * 2**30, 2**40, 5])
def test_format_size_round_trips_exact_sizes(size: int) -> None:
    assert parse_size(format_size(size)) == size


@pytest.mark.parametrize(
    ("text", "millis"),
    [("0.5", 500), ("2", 2000), ("500m", 500), ("1m", 1), ("0.001", 1), ("4096", 4_096_000),
     ("1.25", 1250)],
)
def test_parse_cpu_reads_cores_and_millicores(text: str, millis: int) -> None:
    assert parse_cpu(text) == millis


@pytest.mark.parametrize("text", ["0", "0m", "-1", "4097", "abc", "1.5.5", "", "2 cores"])
def test_parse_cpu_rejects_out_of_range_and_junk(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpu(text)


def test_parse_cpu_rejects_amounts_finer_than_a_millicore() -> None:
    with pytest.raises(ValueError, match="1m"):
        parse_cpu("0.0005")


@pytest.mark.parametrize(("millis", "text"), [(500, "0.5"), (2000, "2"), (1250, "1.25"),
                                              (1, "0.001"), (0, "0")])
def test_format_cpu_prints_cores(millis: int, text: str) -> None:
    assert format_cpu(millis) == text


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("5m", 300), ("2h", 7200), ("1h30m", 5400), ("1d", 86400), ("2.5", 2.5),
    ("500ms", 0.5), (" 10m ", 600)])
def test_parse_duration_reads_the_usual_spellings(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5x", "m5", "0s", "-1s", "31d", "1h 30m", "5mm"])
def test_parse_duration_refuses_junk_zero_and_months(text: str) -> None:
    with pytest.raises(ValueError, match=r"duration|zero|30 days"):
        parse_duration(text)


@pytest.mark.parametrize(("seconds", "text"), [(5400, "1h30m"), (2.5, "2.5s"), (30, "30s"),
                                               (86400, "1d")])
def test_format_seconds_round_trips(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text
    assert parse_duration(text) == seconds
