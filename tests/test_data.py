import numpy as np
import pytest

from deploy.data import Dataset, dataset_from_arrays, load_data
from deploy.errors import DeployError


def _arrays(count: int = 30) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "inputs": rng.standard_normal((count, 1, 8, 8)).astype(np.float64),
        "labels": rng.integers(0, 10, count),
    }


def test_dataset_inputs_float32():
    assert dataset_from_arrays(_arrays(), "test").inputs[0].dtype == np.float32


def test_dataset_labels_int64():
    assert dataset_from_arrays(_arrays(), "test").labels.dtype == np.int64


def test_dataset_numbered_inputs():
    arrays = {"inputs_1": np.zeros((20, 4)), "inputs_0": np.ones((20, 3))}
    assert [a.shape[1] for a in dataset_from_arrays(arrays, "test").inputs] == [3, 4]


def test_dataset_no_labels():
    assert dataset_from_arrays({"inputs": np.zeros((20, 4))}, "test").labels is None


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((30, 4))}, "no model inputs"),
        ({"inputs": np.zeros((30, 4)), "labels": np.zeros(29, np.int64)}, "labels have shape"),
        ({"inputs": np.zeros((30, 4)), "labels": np.zeros(30)}, "integer class ids"),
        ({"inputs_0": np.zeros((30, 4)), "inputs_1": np.zeros((29, 4))}, "same first"),
        ({"inputs": np.full((30, 4), np.nan)}, "NaN"),
        ({"inputs": np.zeros((10, 4))}, "at least 20"),
        ({"inputs": np.array(["a"] * 30)}, "dtype"),
    ],
    ids=["no-inputs", "label-count", "float-labels", "ragged", "nan", "too-few", "strings"],
)
def test_dataset_rejects(arrays, message):
    with pytest.raises(DeployError, match=message):
        dataset_from_arrays(arrays, "bad.npz")


def test_split_sizes():
    calibration, validation = Dataset([np.arange(100)]).split(0.4)
    assert (len(calibration), len(validation)) == (40, 60)


def test_split_disjoint():
    calibration, validation = Dataset([np.arange(100)]).split(0.4)
    assert not set(calibration.inputs[0]) & set(validation.inputs[0])


def test_split_seeded():
    first, _ = Dataset([np.arange(100)]).split(0.4, seed=3)
    second, _ = Dataset([np.arange(100)]).split(0.4, seed=3)
    assert np.array_equal(first.inputs[0], second.inputs[0])


def test_load_data_round_trip(tmp_path):
    np.savez(tmp_path / "data.npz", **_arrays())
    assert len(load_data(tmp_path / "data.npz")) == 30


def test_load_data_missing(tmp_path):
    with pytest.raises(DeployError, match="not found"):
        load_data(tmp_path / "missing.npz")


def test_load_data_garbage(tmp_path):
    (tmp_path / "garbage.npz").write_bytes(b"not a zip archive")
    with pytest.raises(DeployError, match="not a readable .npz"):
        load_data(tmp_path / "garbage.npz")


def test_load_data_no_pickle(tmp_path):
    np.savez(tmp_path / "objects.npz", inputs=np.array([{"a": 1}] * 30, dtype=object))
    with pytest.raises(DeployError, match="objects.npz"):
        load_data(tmp_path / "objects.npz")
