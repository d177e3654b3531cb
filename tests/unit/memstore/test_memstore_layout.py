import pytest

from memstore.layout import PAGE_SIZE, PageRun, format_size, pages_for, parse_size, round_up


def test_page_run_end_and_tuple():
    run = PageRun(5, 3)
    assert run.end == 8
    first, count = run
    assert (first, count) == (5, 3)
    assert run == (5, 3)


@pytest.mark.parametrize("n, m, want", [(0, 4096, 0), (1, 4096, 4096), (4096, 4096, 4096),
                                        (4097, 4096, 8192), (262144, 4096, 262144), (7, 3, 9)])
def test_round_up(n, m, want):
    assert round_up(n, m) == want


@pytest.mark.parametrize("n, m", [(1, 0), (1, -4), (-1, 4)])
def test_round_up_rejects(n, m):
    with pytest.raises(ValueError):
        round_up(n, m)


def test_pages_for():
    assert pages_for(PAGE_SIZE) == 1
    assert pages_for(1 << 30) == 262144


@pytest.mark.parametrize("size", [0, -4096, 4095, 4097, 1.5, "4096", True])
def test_pages_for_rejects(size):
    with pytest.raises(ValueError, match="multiple of 4096|int number"):
        pages_for(size)


@pytest.mark.parametrize(
    "text, want",
    [
        ("512", 512),
        ("0", 0),
        ("4096B", 4096),
        ("64K", 64 << 10),
        ("64k", 64 << 10),
        ("256M", 256 << 20),
        ("256MiB", 256 << 20),
        ("256mib", 256 << 20),
        ("1G", 1 << 30),
        ("1GiB", 1 << 30),
        ("4G", 4 << 30),
        ("2T", 2 << 40),
        (" 8 K ", 8 << 10),
    ],
)
def test_parse_size_good(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize(
    "text, msg",
    [
        ("1.5G", "whole number"),
        ("256MB", "ambiguous"),
        ("1gb", "ambiguous"),
        ("", "whole number"),
        ("-1", "whole number"),
        ("G", "whole number"),
        ("12X", "whole number"),
        ("1 G B", "whole number"),
        ("0x10", "whole number"),
        ("\u0663", "whole number"),  # Arabic-Indic digit three
        ("1Gi", "whole number"),
    ],
)
def test_parse_size_bad(text, msg):
    with pytest.raises(ValueError, match=msg):
        parse_size(text)


def test_parse_size_rejects_non_str():
    with pytest.raises(ValueError):
        parse_size(4096)


@pytest.mark.parametrize("size", [1, 4096, 65536, 3 << 20, 1 << 30, (1 << 30) + 4096])
def test_format_size_round_trips(size):
    assert parse_size(format_size(size)) == size
