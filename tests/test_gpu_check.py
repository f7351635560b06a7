"""bench/gpu_check.sh cannot rot between GPU runs: the script is valid bash, and every stage's command line
is one its program accepts (each benchmark's parser run on the stage's exact arguments, stopped right after
parsing; the benchmarks themselves are dry-run by their own tests), and every test file a stage names exists.
A renamed flag or a removed choice would otherwise first show on the GPU, costing minutes of a rare window.
The packing runs for real with no stage: what comes back holds the whole log, the device and the environment."""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile

import pytest

from conftest import ROOT, bench_module

SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")


def source():
    with open(SCRIPT) as f:
        return f.read()


class Parsed(Exception):
    """Raised instead of running the benchmark once its arguments have parsed."""


def stage_commands():
    """{stage key: argv after `$PY`, with `env VAR=...` prefixes dropped}, from the script's `stage` lines."""
    text = source().replace("\\\n", " ")
    commands = {}
    for line in text.splitlines():
        if not line.startswith("stage "):
            continue
        line = line.replace('"${OFFICIAL_ARG[@]}"', "").replace("$RES", "/tmp/res")
        words = shlex.split(line)
        key, argv = words[1], words[4:]  # stage KEY NAME SECONDS COMMAND...
        if argv[0] == "env":
            argv = argv[1:]
            while re.fullmatch(r"[A-Z_]+=.*", argv[0]):
                argv = argv[1:]
        assert argv[0] == "$PY", line
        commands[key] = argv[1:]
    return commands


def test_the_script_is_valid_bash_and_names_every_stage_it_may_run():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    # a backslash followed by spaces or a comment ends the command there: its next line runs on its own
    assert not re.search(r"\\[ \t]+($|#)", source(), re.M)
    only = re.search(r"ONLY=\$\{ONLY:-([^}]*)\}", source()).group(1).split()
    assert sorted(only) == sorted(stage_commands())  # a stage left out of ONLY's default would never run


@pytest.mark.parametrize("key", sorted(stage_commands()))
def test_each_stage_command_parses(key, monkeypatch):
    argv = stage_commands()[key]
    if argv[:2] == ["-m", "pytest"]:
        files = [a.split("::")[0] for a in argv if a.startswith("tests/")]
        assert files and all(os.path.isfile(os.path.join(ROOT, f)) for f in files), argv
        return
    script = argv[0]
    assert re.fullmatch(r"bench/\w+\.py", script) and os.path.isfile(os.path.join(ROOT, script)), argv
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(Parsed):  # a rejected flag or choice exits 2 with its error line instead
        bench_module(os.path.basename(script)[:-3]).main(argv[1:])


def test_with_no_stage_the_packed_results_hold_the_whole_log_the_device_and_the_environment(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "ONLY": "none", "PYTHON": sys.executable}
    res = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    with tarfile.open(tmp_path / "gpu_check.tgz") as tar:
        files = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
        assert sorted(files) == ["device.json", "environment.txt", "log.txt"]
        log = tar.extractfile(files["log.txt"]).read().decode()
        device = json.loads(tar.extractfile(files["device.json"]).read())
    assert log.rstrip().splitlines()[-1].startswith("results in ")  # the last line is packed (the script waits for tee)
    assert device["torch"] == __import__("torch").__version__
