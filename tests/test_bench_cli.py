"""The bench command line: every registered benchmark is importable and selectable."""

from __future__ import annotations

import pytest

from bench.run import BENCHMARKS, DEFAULT, parse_args


def test_every_default_benchmark_is_registered() -> None:
    assert set(DEFAULT) <= set(BENCHMARKS)


def test_only_accepts_registered_names_and_rejects_others(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args(["--only", "send", "--only", "governed", "--no-record"])
    assert args.only == ["send", "governed"] and args.no_record
    with pytest.raises(SystemExit):
        parse_args(["--only", "nonsense"])
    assert "invalid choice" in capsys.readouterr().err
