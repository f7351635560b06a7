"""bench/prune_compare.py --quick on a tiny digits model: every row, the scatter, and a resumable rerun."""
import json

import pytest

import tinyfusion

from conftest import bench_module, run_main, tiny_dit


def run_compare(argv, capsys):
    code, out, err = run_main(bench_module("prune_compare").main, ["--quick", *argv], capsys)
    assert code == 0, err[-3000:]
    return out


def unit_file(work, *parts):
    return json.loads((work.joinpath(*parts)).read_text())


def test_prune_compare_quick_and_resume(tmp_path, capsys):
    """Every row and the summary recomputed from the unit files the run left: a mean over the wrong runs,
    a short/long mix-up or a tau over the wrong pairs fails; a rerun skips every finished unit."""
    from scipy.stats import kendalltau

    teacher, work, results = tmp_path / "teacher.safetensors", tmp_path / "work", tmp_path / "out" / "prune_compare.json"
    tinyfusion.save(tiny_dit(in_channels=1, num_classes=10, depth=4, hidden_size=32, num_heads=2), str(teacher))
    argv = ["--teacher", str(teacher), "--results", str(results), "--work", str(work)]
    run_compare(argv, capsys)
    result = json.loads(results.read_text())
    assert len(result["rows"]) == 13 and len(result["scatter"]) == 4
    units = result["units"]
    for row in result["rows"]:
        unit = units[f"{row['method']}/seed0"]  # a row with another row's mask reuses that row's recovery
        rec = ("recover", unit.get("reused_from", row["method"]), "seed0")
        for budget, name in (("short", "eval-short.json"), ("long", "eval-long.json")):
            ev = unit_file(work, *rec, name)
            assert row[budget]["digits_fid_mean"] == ev["digits_fid"] and row[budget]["digits_fid_std"] == 0.0
            assert row[budget]["class_accuracy_mean"] == ev["class_accuracy"] and ev["sampler"]["steps"] == 10
        assert row["kept"] == [tinyfusion.load(str(work.joinpath(*rec, "recovered.safetensors"))).provenance["kept"]]
        assert row["long"]["steps"] == 3 * row["short"]["steps"] == 18
    scatter = [(unit_file(work, "random-masks", f"mask{i}", "decision.json")["calibration_loss"],
                unit_file(work, "random-masks", f"mask{i}", "recover", "eval.json")["digits_fid"]) for i in range(4)]
    assert [(r["calibration_loss"], r["digits_fid"]) for r in result["scatter"]] == scatter
    assert result["kendall_tau"] == pytest.approx(kendalltau(*zip(*scatter)).statistic)
    row = result["rows"][0]
    assert row["method"] == "learnable-1:2-lora"
    assert row["calibration_loss_mean"] == unit_file(work, "prune", "method-learnable-scheme-1:2-delta-w-lora", "seed0",
                                                     "decision.json")["calibration_loss"]
    assert {"digits_fid_mean", "digits_fid_std", "class_accuracy_mean", "precision_mean", "recall_mean"} <= set(row["short"])
    assert {"command", "machine", "wall_s"} <= set(result)
    for suffix in (".md", "_fid.png", "_scatter.png"):
        assert (tmp_path / "out" / f"prune_compare{suffix}").exists()
    again = run_compare(argv, capsys)
    assert "== " not in again  # every unit was kept and skipped
    assert json.loads(results.read_text())["units"] == units


def test_compare_table_from_a_real_finetune_evaluation(tmp_path, capsys):
    """finetune's final evaluation is of the weights it saves (the EMA: an evaluation of the student, or of
    other settings, differs), and compare's row is that evaluation and its speed against the teacher's."""
    from tinyfusion.compare import main as compare_main
    from tinyfusion.evaluate import main as evaluate_main
    from tinyfusion.finetune import main as finetune_main
    from tinyfusion.prune import main as prune_main

    from conftest import assert_one_line_error

    teacher = tmp_path / "teacher.safetensors"
    tinyfusion.save(tiny_dit(in_channels=1, num_classes=10, depth=4, hidden_size=32, num_heads=2), str(teacher))
    for main, argv in [
        (prune_main, ["--ckpt", str(teacher), "--method", "first", "--out", str(tmp_path / "p")]),
        (finetune_main, ["--ckpt", str(tmp_path / "p" / "pruned.safetensors"), "--teacher", str(teacher), "--kd", "none",
                         "--steps", "3", "--global-batch-size", "8", "--eval-samples", "100", "--out", str(tmp_path / "r")]),
        (evaluate_main, ["--ckpt", str(tmp_path / "r" / "recovered.safetensors"), "--samples", "100", "--json", str(tmp_path / "r.json")]),
        (evaluate_main, ["--ckpt", str(teacher), "--samples", "100", "--json", str(tmp_path / "t.json")]),
    ]:
        code, _, err = run_main(main, argv, capsys)
        assert code == 0, err
    inside = json.loads((tmp_path / "r" / "metrics.json").read_text())["evaluation"]
    alone = json.loads((tmp_path / "r.json").read_text())
    for key in ("digits_fid", "real_floor_fid", "class_accuracy", "precision", "recall", "depth", "params", "sampler"):
        assert inside[key] == alone[key], key
    assert inside["depth"] == 2
    code, out, err = run_main(compare_main, [f"teacher={tmp_path / 't.json'}", f"pruned={tmp_path / 'r' / 'metrics.json'}"], capsys)
    assert code == 0, err
    teacher_m = json.loads((tmp_path / "t.json").read_text())
    row = next(l for l in out.splitlines() if l.startswith("| pruned |")).split("|")[1:-1]
    assert [c.strip() for c in row[:5]] == ["pruned", "2", f"{inside['params'] / 1e6:.2f}M",
                                            f"{inside['digits_fid']:.2f} ({inside['real_floor_fid']:.2f})",
                                            f"{inside['digits_fid'] / inside['real_floor_fid']:.2f}"]
    speed = teacher_m["sampling_seconds_per_image"] / inside["sampling_seconds_per_image"]
    assert row[7].strip() == f"{speed:.2f}x"
    code, _, err = run_main(compare_main, ["nolabel"], capsys)
    assert_one_line_error(code, err, "NAME=PATH")


def test_prune_compare_quick_covers_a_sit_teacher(tmp_path, capsys):
    """The same bench on a SiT: every step reads the flow objective from the checkpoint's metadata."""
    m = tiny_dit(in_channels=1, num_classes=10, depth=4, hidden_size=32, num_heads=2, learn_sigma=False)
    m.config.objective = "flow"
    teacher = tmp_path / "sit.safetensors"
    tinyfusion.save(m, str(teacher))
    out = tmp_path / "out" / "prune_compare.json"
    run_compare(["--teacher", str(teacher), "--methods", "learnable-1:2-lora", "bi", "learnable-1:2-lora+maskedkd",
                 "--results", str(out), "--work", str(tmp_path / "work")], capsys)
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"learnable-1:2-lora", "bi", "learnable-1:2-lora+maskedkd"}
    sampler = json.loads((tmp_path / "work" / "recover" / "bi" / "seed0" / "eval-long.json").read_text())["sampler"]
    assert sampler["name"] == "heun"  # evaluated with the flow sampler
    recovered = tinyfusion.load(str(tmp_path / "work" / "recover" / "bi" / "seed0" / "recovered.safetensors"))
    assert recovered.config.objective == "flow"


def test_prune_compare_quick_covers_a_mar_teacher_and_skips_rows_that_cannot_apply(tmp_path, capsys):
    """On a MAR (two stacks of 4): 2:4 runs, first/last would empty a stack and are skipped with the reason."""
    from test_mar import tiny_mar

    teacher = tmp_path / "mar.safetensors"
    tinyfusion.save(tiny_mar(), str(teacher))
    out = tmp_path / "out" / "prune_compare.json"
    stdout = run_compare(["--teacher", str(teacher), "--methods", "learnable-2:4-lora", "first", "last", "bi",
                          "--results", str(out), "--work", str(tmp_path / "work")], capsys)
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"learnable-2:4-lora", "bi"}
    assert "first/seed0: skipped, keeping the first half of [4, 4] leaves a stack empty" in stdout
    assert "last/seed0: skipped" in stdout
    sampler = json.loads((tmp_path / "work" / "recover" / "bi" / "seed0" / "eval-long.json").read_text())["sampler"]
    assert sampler["name"] == "mar"
