"""segment_mm.py: the per-segment matmul as an autograd node (eager) and as a custom op (torch.compile) computes
each expert's rows times its weights, zeros past the last segment, and the same gradients as a reference loop."""
import pytest
import torch
from torch.testing import assert_close

from switch_core.segment_mm import SegmentMM, segment_mm

E, D, F = 3, 8, 5


def _case(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(rows) + 2, D, generator=g, dtype=torch.float64, requires_grad=True)  # 2 spare rows
    w = torch.randn(E, D, F, generator=g, dtype=torch.float64, requires_grad=True)
    offs = torch.tensor(rows).cumsum(0).to(torch.int32)
    return x, w, offs


def _reference(x, w, rows):
    out, a = [], 0
    for e, n in enumerate(rows):
        out.append(x[a:a + n] @ w[e])
        a += n
    return torch.cat(out + [x.new_zeros(x.shape[0] - a, F)])


@pytest.mark.parametrize("rows", [[3, 0, 4], [0, 0, 5], [2, 2, 2], [0, 0, 0]])
@pytest.mark.parametrize("form", ["autograd node", "custom op"])
def test_segments_equal_a_reference_loop_forward_and_backward(rows, form):
    x, w, offs = _case(rows)
    run = (lambda: SegmentMM.apply(x, w, [0] + offs.tolist())) if form == "autograd node" else \
        (lambda: segment_mm(x, w, offs))
    g = torch.randn(x.shape[0], F, dtype=torch.float64)
    y = run()
    assert (y[sum(rows):] == 0).all()
    gx, gw = torch.autograd.grad(y, (x, w), g)
    ref = _reference(x, w, rows)
    rgx, rgw = torch.autograd.grad(ref, (x, w), g)
    assert_close(y, ref)
    assert_close(gx, rgx)
    assert_close(gw, rgw)  # an expert without rows: an exact zero block
    assert all((gw[e] == 0).all() for e, n in enumerate(rows) if n == 0)


def test_the_custom_op_passes_torch_library_opcheck():
    # schema, fake (meta) implementation, autograd registration, and agreement under torch.compile's tracing
    x, w, offs = _case([3, 1, 4])
    torch.library.opcheck(segment_mm, (x, w, offs))
    torch.library.opcheck(torch.ops.switch_core.segment_mm_weight_grad,
                          (x.detach(), torch.randn(x.shape[0], F, dtype=torch.float64), offs, E))
