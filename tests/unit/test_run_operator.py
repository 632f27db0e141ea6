"""`vlmctl operator` options for running replicas with Kopf peering: the replica started first has the
higher priority (a later one never displaces it), and a bad option is one line naming it."""

from __future__ import annotations

import pytest
from vlm_operator import run_operator


def test_an_earlier_start_is_a_higher_priority_and_milliseconds_apart_never_tie() -> None:
    first, second = run_operator.seniority_priority(1_796_000_000.000), run_operator.seniority_priority(1_796_000_000.001)
    assert first > second
    assert run_operator.seniority_priority() < first  # started now: behind a replica that started before
    assert abs(first) < 2**53  # an exact integer in JSON (the peering object's status)


def test_peering_options_parse_and_default_to_standalone() -> None:
    args = run_operator.build_parser().parse_args([])
    assert args.peering is None and args.peering_lifetime == run_operator.PEERING_LIFETIME
    args = run_operator.build_parser().parse_args(["--peering", "vlm-operator", "--peering-lifetime", "20"])
    assert (args.peering, args.peering_lifetime) == ("vlm-operator", 20)


def test_a_too_short_peering_lifetime_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        run_operator.main(["--peering", "vlm-operator", "--peering-lifetime", "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--peering-lifetime" in err and "2 seconds or more" in err
