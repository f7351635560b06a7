"""The row tile shared by the row-wise forward kernels (adaLN, E4M3 quantization)."""
import triton
import triton.language as tl


@triton.jit
def row_tile(n_rows, D, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's ROWS rows (int64: row * D passes 2^31 at DiT-XL/2 batch 7282), their columns, the
    (ROWS, BLOCK) mask and element offsets."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    rmask = rows < n_rows
    m = rmask[:, None] & (cols < D)[None, :]
    return rows, cols, rmask, m, rows[:, None] * D + cols[None, :]
