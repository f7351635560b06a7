"""bench/prune_compare.py --quick on a tiny digits model: every row, the scatter, and a resumable rerun."""
import json
import os
import sys

import tinyfusion

from conftest import ROOT, run_module, tiny_dit


def test_prune_compare_quick_and_resume(tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    tinyfusion.save(tiny_dit(in_channels=1, num_classes=10, depth=4, hidden_size=32, num_heads=2), str(teacher))
    cmd = [sys.executable, os.path.join(ROOT, "bench", "prune_compare.py"), "--quick", "--teacher", str(teacher),
           "--results", str(tmp_path / "out" / "prune_compare.json"), "--work", str(tmp_path / "work")]
    first = run_module(cmd)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "prune_compare.json").read_text())
    assert len(result["rows"]) == 13 and len(result["scatter"]) == 4 and -1 <= result["kendall_tau"] <= 1
    row = result["rows"][0]
    assert row["method"] == "learnable-1:2-lora" and row["long"]["steps"] == 3 * row["short"]["steps"]
    assert {"digits_fid_mean", "digits_fid_std", "class_accuracy_mean", "precision_mean", "recall_mean"} <= set(row["short"])
    assert {"command", "machine", "wall_s"} <= set(result)
    for suffix in (".md", "_fid.png", "_scatter.png"):
        assert (tmp_path / "out" / f"prune_compare{suffix}").exists()
    again = run_module(cmd)
    assert again.returncode == 0 and "== " not in again.stdout  # every unit was kept and skipped
    assert json.loads((tmp_path / "out" / "prune_compare.json").read_text())["units"] == result["units"]


def test_compare_table(tmp_path, capsys):
    from tinyfusion.compare import main

    from conftest import assert_one_line_error, run_main

    base = {"digits_fid": 10.0, "real_floor_fid": 8.0, "class_accuracy": 0.97, "depth": 12, "params": 3.6e6,
            "sampling_seconds_per_image": 0.004}
    (tmp_path / "t.json").write_text(json.dumps(base))
    (tmp_path / "s.json").write_text(json.dumps({"evaluation": {**base, "depth": 6, "sampling_seconds_per_image": 0.002}}))
    code, out, err = run_main(main, [f"teacher={tmp_path / 't.json'}", f"pruned={tmp_path / 's.json'}"], capsys)
    assert code == 0 and "| pruned | 6 |" in out and "2.00x" in out
    code, _, err = run_main(main, ["nolabel"], capsys)
    assert_one_line_error(code, err, "NAME=PATH")


def test_prune_compare_quick_covers_a_sit_teacher(tmp_path):
    """The same bench on a SiT: every step reads the flow objective from the checkpoint's metadata."""
    m = tiny_dit(in_channels=1, num_classes=10, depth=4, hidden_size=32, num_heads=2, learn_sigma=False)
    m.config.objective = "flow"
    teacher = tmp_path / "sit.safetensors"
    tinyfusion.save(m, str(teacher))
    out = tmp_path / "out" / "prune_compare.json"
    res = run_module([sys.executable, os.path.join(ROOT, "bench", "prune_compare.py"), "--quick", "--teacher", str(teacher),
                      "--methods", "learnable-1:2-lora", "bi", "learnable-1:2-lora+maskedkd", "--results", str(out),
                      "--work", str(tmp_path / "work")])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"learnable-1:2-lora", "bi", "learnable-1:2-lora+maskedkd"}
    sampler = json.loads((tmp_path / "work" / "recover" / "bi" / "seed0" / "eval-long.json").read_text())["sampler"]
    assert sampler["name"] == "heun"  # evaluated with the flow sampler
    recovered = tinyfusion.load(str(tmp_path / "work" / "recover" / "bi" / "seed0" / "recovered.safetensors"))
    assert recovered.config.objective == "flow"


def test_prune_compare_quick_covers_a_mar_teacher_and_skips_rows_that_cannot_apply(tmp_path):
    """On a MAR (two stacks of 4): 2:4 runs, first/last would empty a stack and are skipped with the reason."""
    from test_mar import tiny_mar

    teacher = tmp_path / "mar.safetensors"
    tinyfusion.save(tiny_mar(), str(teacher))
    out = tmp_path / "out" / "prune_compare.json"
    res = run_module([sys.executable, os.path.join(ROOT, "bench", "prune_compare.py"), "--quick", "--teacher", str(teacher),
                      "--methods", "learnable-2:4-lora", "first", "last", "bi", "--results", str(out),
                      "--work", str(tmp_path / "work")])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"learnable-2:4-lora", "bi"}
    assert "first/seed0: skipped, keeping the first half of [4, 4] leaves a stack empty" in res.stdout
    assert "last/seed0: skipped" in res.stdout
    sampler = json.loads((tmp_path / "work" / "recover" / "bi" / "seed0" / "eval-long.json").read_text())["sampler"]
    assert sampler["name"] == "mar"
