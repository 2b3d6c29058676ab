import numpy as np
import pytest
import torch

from exporters.tensorrt import TensorRTRunner, TensorRTUnavailable, engine_from_onnx

SHAPES = {"input": (1, 1, 8, 8)}


def _tensorrt_missing() -> str | None:
    if not torch.cuda.is_available():
        return "needs an NVIDIA GPU with CUDA"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "needs the tensorrt package"
    return None


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without a GPU"
)
def test_engine_without_gpu_names_gpu(digits_onnx, tmp_path):
    with pytest.raises(TensorRTUnavailable, match="NVIDIA GPU"):
        engine_from_onnx(
            digits_onnx,
            tmp_path / "digits.engine",
            min_shapes=SHAPES,
            opt_shapes=SHAPES,
            max_shapes=SHAPES,
        )


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without a GPU"
)
def test_runner_without_gpu_names_gpu(tmp_path):
    with pytest.raises(TensorRTUnavailable, match="ONNX Runtime device profile"):
        TensorRTRunner(tmp_path / "digits.engine")


@pytest.mark.gpu
@pytest.mark.skipif(_tensorrt_missing() is not None, reason=str(_tensorrt_missing()))
def test_engine_fp16_matches_torch(digits_onnx, digits_reference, heldout, tmp_path):
    engine = engine_from_onnx(
        digits_onnx,
        tmp_path / "digits.engine",
        precision="fp16",
        min_shapes={"input": (1, 1, 8, 8)},
        opt_shapes={"input": (1, 1, 8, 8)},
        max_shapes={"input": (8, 1, 8, 8)},
    )
    (output,) = TensorRTRunner(engine).run({"input": heldout["inputs"][:8]})
    assert np.array_equal(output.argmax(1), digits_reference[:8].argmax(1))
