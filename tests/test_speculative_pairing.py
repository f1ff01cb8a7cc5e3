"""Pairing guesses that one-to-one candidates fit, without reading their headers, and checks the guesses against
the shapes the workers open anyway: the report must be the one reading every header first gives, also when a
guess is wrong (the run is then redone reading first)."""
from __future__ import annotations

import pytest

from atb_mirror import mirror_pair, report_text, rewritten_copy
from pytest_ait_llm.api import run_compare
from pytest_ait_llm.compare import engine as engine_mod


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    return mirror_pair(tmp_path_factory)


def _exact(monkeypatch):
    """Make every run read first: the guesses are never trusted."""
    monkeypatch.setattr(engine_mod.Engine, "_speculation_held", lambda self, tasks: False)


def _count_runs_and_early_reads(monkeypatch):
    seen = {"runs": 0, "early_reads": 0, "comparing": False}
    run, compute, meta = engine_mod.Engine._run, engine_mod.Engine._compute, engine_mod.ReadOptions.meta

    def counted_run(self):
        seen["runs"] += 1
        seen["comparing"] = False
        return run(self)

    def counted_compute(self, tasks):
        seen["comparing"] = True
        return compute(self, tasks)

    def counted_meta(self, path):
        seen["early_reads"] += not seen["comparing"]
        return meta(self, path)

    monkeypatch.setattr(engine_mod.Engine, "_run", counted_run)
    monkeypatch.setattr(engine_mod.Engine, "_compute", counted_compute)
    monkeypatch.setattr(engine_mod.ReadOptions, "meta", counted_meta)
    return seen


def test_one_to_one_pairs_are_not_read_before_comparing(dumps, tmp_path, monkeypatch):
    golden, my = dumps
    monkeypatch.setenv("AIT_LLM_EXECUTOR", "serial")
    seen = _count_runs_and_early_reads(monkeypatch)
    guessed = run_compare(golden, my, output_dir=tmp_path / "guessed")
    assert seen["runs"] == 1  # every guess held
    # pairing asks the one callback it is given; whole-type rules leave no candidate list that is not one-to-one
    assert seen["early_reads"] == 0, seen
    _exact(monkeypatch)
    exact = run_compare(golden, my, output_dir=tmp_path / "exact")
    assert report_text(guessed) == report_text(exact)


def test_a_wrong_guess_is_redone_and_reports_the_exact_pairing(dumps, tmp_path, monkeypatch):
    """A layer-1 Linear whose output has another shape than its module's: the guess that it fits is wrong."""
    golden, my = dumps
    mine = tmp_path / "my"
    target = rewritten_copy(my, mine, "outtensor0.bin", lambda values: values[..., : values.shape[-1] // 2])
    monkeypatch.setenv("AIT_LLM_EXECUTOR", "serial")
    seen = _count_runs_and_early_reads(monkeypatch)
    guessed = run_compare(golden, mine, output_dir=tmp_path / "guessed")
    assert seen["runs"] == 2  # the guess failed its check, and the run was redone reading first
    _exact(monkeypatch)
    exact = run_compare(golden, mine, output_dir=tmp_path / "exact")
    assert report_text(guessed) == report_text(exact)
    assert any(u.name.endswith(target.parent.parent.name) or target.parent.parent.name in u.name
               for u in guessed.unpaired), "the misfit op is reported unpaired, as reading first decides"
