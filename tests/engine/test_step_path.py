"""engine/step_path.py: the one rule for which weights and code a step runs on."""

from __future__ import annotations

from budrt.engine.step_path import EXACT_ROWS, PathRule, StepPath

RULE = PathRule(small_rows=16, small_logits_rows=4, stack=True)


def test_small_decode_steps_read_the_small_copies() -> None:
    assert RULE.choose(1, decode_only=True, seeded=False) == StepPath(True, True, 0, True)
    assert RULE.choose(8, decode_only=True, seeded=False) == StepPath(True, False, 0, True)
    assert RULE.choose(17, decode_only=True, seeded=False) == StepPath(False, False, 0, True)


def test_prompt_chunks_read_the_dense_weights_through_the_python_layers() -> None:
    assert RULE.choose(3, decode_only=False, seeded=False) == StepPath(False, False, 0, False)


def test_seeded_steps_read_the_dense_weights_in_exact_rows() -> None:
    for rows, decode_only in ((1, True), (40, True), (40, False)):
        path = RULE.choose(rows, decode_only=decode_only, seeded=True)
        assert not path.small and not path.small_logits and path.split_rows == EXACT_ROWS
        assert path.stack == decode_only


def test_a_model_without_small_copies_or_stack_always_runs_dense_layers() -> None:
    rule = PathRule()
    assert rule.choose(1, decode_only=True, seeded=False) == StepPath(False, False, 0, False)
    assert "dense" in rule.describe() and "4-bit" in RULE.describe()


def test_int8_dense_weights_need_no_split_and_leave_the_stack_to_small_steps() -> None:
    rule = PathRule(small_rows=16, small_logits_rows=4, stack=True, dense_int8=True)
    assert rule.choose(8, decode_only=True, seeded=False) == StepPath(True, False, 0, True)
    assert rule.choose(40, decode_only=True, seeded=False) == StepPath(False, False, 0, False)
    assert rule.choose(40, decode_only=True, seeded=True) == StepPath(False, False, 0, False)
    assert rule.choose(1, decode_only=True, seeded=True) == StepPath(False, False, 0, False)
    assert "int8" in rule.describe()
