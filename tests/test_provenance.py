import argparse
import runpy
import sys
from pathlib import Path

import pytest

from blockscale._provenance import command, provenance

SCRIPTS = sorted((Path(__file__).parent.parent / "benchmarks").glob("*.py"))


def test_command_spells_out_every_option(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    args = argparse.Namespace(
        bank="b", repeats=30, tflite=True, quick=False, target=None, policy=["free", "x=1"],
        out_json="o.json",
    )  # fmt: skip
    assert command("benchmarks/x.py", args) == (
        "python benchmarks/x.py --bank b --repeats 30 --tflite --policy free --policy x=1"
    )
    assert command("x.py", args, skip={"bank", "policy", "out_json"}) == (
        "python x.py --repeats 30 --tflite"
    )


def test_command_names_the_thread_count_it_ran_under(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert command("x.py", argparse.Namespace(k=5)) == "OMP_NUM_THREADS=1 python x.py --k 5"


def test_provenance_says_where_and_when():
    record = provenance()
    assert set(record) == {"machine", "python", "torch", "onnxruntime", "date"}
    assert record["torch"].startswith("2.13") and len(record["date"]) == 10


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_every_benchmark_script_imports_and_parses_its_options(script, monkeypatch, capsys):
    # as `python benchmarks/SCRIPT.py` runs it: its folder first on the path, for its siblings
    monkeypatch.syspath_prepend(str(script.parent))
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out
