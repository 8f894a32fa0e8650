"""lazyfast.precision: the process-wide matmul mode of the compiled ops (CPU part; the CUDA
effects are checked in tests/test_cuda_driver.py)."""
import pytest
import torch

import lazyfast.precision as P
from lazyfast import _ext
from lazyfast._ops import two_layer as TL
from two_layer_cases import inputs, make_model, weights


def test_default_set_get_and_context_manager():
    assert P.get_matmul_precision() == "highest"
    with P.matmul_precision("tf32"):
        assert P.get_matmul_precision() == "tf32"
        assert P.set_matmul_precision("tf32") == "tf32"
    assert P.get_matmul_precision() == "highest"
    with pytest.raises(KeyError):
        with P.matmul_precision("tf32"):
            raise KeyError("boom")
    assert P.get_matmul_precision() == "highest"


def test_bad_modes_are_rejected():
    with pytest.raises(ValueError, match="highest"):
        P.set_matmul_precision("fast")
    with pytest.raises(TypeError):
        P.set_matmul_precision(1)
    assert P.get_matmul_precision() == "highest"


@pytest.mark.skipif(not _ext.HAS_CPU_KERNELS, reason="extension not built")
def test_mode_lives_in_the_extension_and_cpu_results_do_not_change():
    with pytest.raises(RuntimeError, match="matmul mode"):
        torch.ops.lazyfast.set_matmul_mode(2)
    model = make_model(5, 50, 2, "tanh", bias=True)
    A, c, B = (t.float() for t in weights(model))
    x = inputs(40, 5).float()
    hi = TL.two_layer_ntk(x, A=A, B=B, c=c, scale=model.scale, mode="full")
    with P.matmul_precision("tf32"):
        assert int(torch.ops.lazyfast.matmul_mode()) == 1
        tf = TL.two_layer_ntk(x, A=A, B=B, c=c, scale=model.scale, mode="full")
    assert torch.equal(hi, tf)  # CPU GEMMs are IEEE float32 in both modes
