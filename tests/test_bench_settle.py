"""bench/settle.py: a small real run writes a row per pause, before nothing and after an onnxruntime run,
each slowdown against the quiet row of the same pause; bad input is one line."""
import json
import sys

import pytest

from conftest import ROOT, assert_one_line_error, run_main

sys.path.insert(0, f"{ROOT}/bench")
import settle  # noqa: E402


def test_small_run_writes_every_pause(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(settle, "SETTLE_S", 0.01)
    out = tmp_path / "settle.json"
    code, stdout, err = run_main(settle.main, ["--depth", "1", "--pauses-ms", "0", "5", "--repeats", "2",
                                               "--json", str(out)], capsys)
    assert code == 0, err
    rows = json.loads(out.read_text())["rows"]
    assert [(r["before"], r["pause_ms"]) for r in rows] == [("nothing", 0), ("nothing", 5), ("onnxruntime", 0),
                                                           ("onnxruntime", 5)]
    quiet = {r["pause_ms"]: r["cpp_ms"] for r in rows if r["before"] == "nothing"}
    for r in rows:
        assert r["cpp_ms"] > 0 and r["slowdown"] == pytest.approx(r["cpp_ms"] / quiet[r["pause_ms"]])
    assert stdout.count("| 0 |") == 1 and stdout.count("| 5 |") == 1


@pytest.mark.parametrize("argv,fragment", [(["--pauses-ms", "-1"], "--pauses-ms"), (["--pauses-ms", "x"], "--pauses-ms"),
                                           (["--depth", "0"], "--depth")])
def test_bad_input_is_one_line(argv, fragment, capsys, tmp_path):
    code, _, err = run_main(settle.main, argv + ["--json", str(tmp_path / "x.json")], capsys)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "x.json").exists()
