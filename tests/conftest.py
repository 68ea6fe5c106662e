from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
CIFAR = ASSETS / "cifar10-subset"
R20 = ASSETS / "weights" / "resnet20-12fca82f.th"
R56 = ASSETS / "weights" / "resnet56-4bfd9763.th"

needs_assets = pytest.mark.skipif(not (CIFAR.is_dir() and R20.is_file() and R56.is_file()),
                                  reason=f"shared assets not found at {ASSETS} (clone with ../shared beside it)")


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def cifar():
    from pruning_core import load_data
    return load_data(f"cifar10:{CIFAR}")


@pytest.fixture(scope="session")
def resnet20():
    from pruning_core import build_model, load_weights
    return load_weights(build_model("resnet20"), R20).eval()


@pytest.fixture(scope="session")
def resnet56():
    from pruning_core import build_model, load_weights
    return load_weights(build_model("resnet56"), R56).eval()


@pytest.fixture(scope="session")
def digits():
    from pruning_core import load_data
    return load_data("digits")


@pytest.fixture(scope="session")
def digits_session(digits):
    """A random-init digits CNN with tiny splits: fast enough for env and agent smoke tests."""
    from pruning_core import PruningSession, SessionConfig
    torch.manual_seed(0)
    return PruningSession("digits_cnn", None, digits, SessionConfig(reward_images=64, calib_batches=1,
                                                                     taylor_batches=2))


@pytest.fixture(scope="session")
def digits_weights(tmp_path_factory, digits):
    """A digits CNN fine-tuned for 3 epochs (about 97% test accuracy), saved as a state_dict."""
    from pruning_core import FinetuneConfig, build_model, finetune
    torch.manual_seed(0)
    model = finetune(build_model("digits_cnn"), digits.train, FinetuneConfig.plain(3))
    path = tmp_path_factory.mktemp("w") / "digits_cnn.pt"
    torch.save(model.state_dict(), path)
    return path
