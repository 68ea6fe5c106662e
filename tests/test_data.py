"""Data sets and weights (pruning_core.data): the shared CIFAR subset and pretrained ResNets, and CIFAR batches
read without unpickling code."""

import pytest
from conftest import needs_assets

from pruning_core import accuracy


@needs_assets
def test_pretrained_accuracy(cifar, resnet20, resnet56):
    assert len(cifar.test) == 1017 and len(cifar.train) == 5085
    assert accuracy(resnet56, cifar.test) >= 92.0
    assert accuracy(resnet20, cifar.test) >= 91.0


def test_cifar_batches_are_read_without_running_code(tmp_path):
    """A data_batch whose pickle carries a __reduce__ payload runs nothing: one clear error, no marker file; a
    batch that pickles a list is refused in one line too."""
    import pickle

    import numpy as np

    from pruning_core import UserError, load_data
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    good = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "batch_label": "b", "filenames": ["a", "b"]}
    (folder / "test_batch").write_bytes(pickle.dumps(good))
    (folder / "data_batch_1").write_bytes(pickle.dumps({**good, "labels": Payload()}))
    with pytest.raises(UserError, match="data_batch_1 is not a CIFAR-10 python batch: it references io.open"):
        load_data(f"cifar10:{tmp_path}")
    assert not marker.exists()
    (folder / "data_batch_1").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(UserError, match="holds a list"):
        load_data(f"cifar10:{tmp_path}")
    (folder / "data_batch_1").write_bytes(pickle.dumps(good))
    assert len(load_data(f"cifar10:{tmp_path}").train) == 2  # numpy arrays as the format stores them still load
