import functools
import os
import subprocess
import sys

# Triton kernels run in the interpreter on the CPU. It must be set before triton is first imported
# (torch.compile imports it), so here, for the whole session; bench/gpu_check.sh sets it to 0.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tinyfusion.models import DiT, DiTConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(min(2, torch.get_num_threads()))


@functools.cache
def interpreter_loop_defect():
    """Why Triton's interpreter cannot run a kernel loop with a runtime bound here, or None. Triton 3.6's
    interpreter takes the bound as int() of a one-element NumPy array, which NumPy 2.4 refuses ("only
    0-dimensional arrays can be converted"); Triton 3.9's squeezes it first. Compiled kernels never see it."""
    import numpy as np
    import triton
    import triton.language as tl

    @triton.jit
    def count_to(out, n):
        total = 0
        for _ in range(0, n):
            total += 1
        tl.store(out, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count_to[(1,)](out, 3)
    except Exception as e:  # the interpreter wraps the TypeError in its own error type
        if "0-dimensional" not in str(e):
            raise
        return (f"Triton {triton.__version__}'s interpreter cannot loop to a runtime bound under NumPy "
                f"{np.__version__} (numpy<2.4 runs these tests)")
    assert out.item() == 3
    return None


@pytest.fixture
def interpreter_loops():
    """Skips a test whose kernels loop to a runtime bound (flash attention) where the interpreter cannot."""
    reason = interpreter_loop_defect()
    if reason:
        pytest.skip(reason)


def tiny_config(**kw):
    base = dict(depth=3, hidden_size=48, patch_size=2, num_heads=3, input_size=8, in_channels=4, num_classes=5)
    base.update(kw)
    return DiTConfig(**base)


def randomized(model, seed=0):
    """A DiT with every weight random and every block's part of the output of order 1: Linear weights at
    1/sqrt(fan_in), adaLN biases (shift, scale, gate) at 0.5. Fresh DiTs zero their adaLN and output
    layers; small random weights (gates near 0.04) made every block about 2% of the output, so a graph
    or backend that dropped or reordered a block passed tolerances near 1e-3. Here dropping any block
    moves the output by more than half its norm (test_model.py checks it)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue
            if p.dim() >= 2 and "embedding_table" not in name:
                std = p[0].numel() ** -0.5
            elif "adaLN" in name:
                std = 0.5
            else:
                std = 1.0 if "embedding_table" in name else 0.05
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def tiny_dit(seed=0, **kw):
    torch.manual_seed(seed)
    return randomized(DiT(tiny_config(**kw)), seed)


def inputs(cfg, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, cfg.num_classes, (n,), generator=g)
    return x, t, y


def run_main(main, argv, capsys):
    """Run a CLI's main in-process: (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def write_latent_folder(root, count, shape, num_classes, name="imagenet64"):
    """`count` latent files of `shape` in the official layout (<name>_features/, <name>_labels/), label i % num_classes."""
    import numpy as np

    for sub in (f"{name}_features", f"{name}_labels"):
        (root / sub).mkdir(parents=True)
    g = np.random.default_rng(0)
    for i in range(count):
        np.save(root / f"{name}_features" / f"{i}.npy", g.normal(size=shape).astype(np.float32))
        np.save(root / f"{name}_labels" / f"{i}.npy", np.array([i % num_classes]))
    return root


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """A real diffusers AutoencoderKL (random weights, tiny config, 8x down) saved as a local folder."""
    import diffusers

    path = tmp_path_factory.mktemp("vae") / "vae"
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
    )
    vae.save_pretrained(path)
    return str(path)


def assert_close_weights(a, b, atol):
    """Two name -> tensor dicts equal to atol, but for the attention key bias. Its gradient is zero in
    exact arithmetic (adding one constant to every score of a query leaves the softmax unchanged), so
    Adam, which normalizes the gradient's size away, turns its rounding noise into lr-sized steps that
    differ between summation orders; the query and value biases are compared."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k.endswith(("attn.qkv.bias", "attn.qkv.base.bias")):
            third = x.numel() // 3
            x, y = torch.cat([x[:third], x[2 * third:]]), torch.cat([y[:third], y[2 * third:]])
        torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def script_module(folder, name):
    """<folder>/<name>.py (bench/, export/: scripts, not a package) imported as a module, to call its main
    in-process; the scripts put the repository root first on sys.path, which is restored here."""
    import importlib.util

    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location(f"{folder}_{name}", os.path.join(ROOT, folder, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def bench_module(name):
    return script_module("bench", name)


def run_script(folder, name, *argv):
    """A script's main in-process: an object with returncode, stdout and stderr, like subprocess.run's."""
    import contextlib
    import io
    import types

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            script_module(folder, name).main(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def torchrun(nproc):
    """`python -m torch.distributed.run` with a standalone rendezvous on a port the launcher binds itself
    (probing for a free port and passing it races another run taking it in between)."""
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def run_module(args, timeout=600, env=None):
    """Run `python -m ...` (or torchrun) in a subprocess from the repo root."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(args if args[0] != "-m" else [sys.executable, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def failure(res):
    """What to show when a subprocess (or torchrun's ranks) failed: every rank's traceback and error line,
    then the tail. torchrun's own summary at the end names only the first failed rank and its exit code,
    so a bare `stderr[-2000:]` loses the message of the rank that died."""
    lines = res.stderr.splitlines()
    # the last four: what a rank that aborts or crashes in C++ prints (no traceback, torchrun says only SIGABRT)
    marks = ("Traceback", "error:", "terminate called", "Fatal Python error", "free(): ", "Segmentation fault")
    starts = [i for i, l in enumerate(lines) if any(m in l for m in marks)]
    shown = [l for i in starts[:4] for l in lines[i:i + 40]]
    return "\n".join([f"exit {res.returncode}", *shown, "...", *lines[-15:]])


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [l[l.index("error:"):] for l in err.splitlines() if "error:" in l]  # progress-bar residue aside
    assert len(lines) == 1, err
    for f in fragments:
        assert f in lines[0], lines[0]
