"""Reach: image folders streamed from disk at any image size, the device option, and models by name with their head."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pruning_core import PruningSession, SessionConfig, UserError, build_model, load_data, load_weights
from pruning_core.device import resolve_device
from pruning_core.folder import decode
from pruning_core.splits import FolderSplit

CLASSES = ("cat", "dog", "frog")
ROOT = Path(__file__).resolve().parents[1]


def _folder(root: Path, per_class: int = 6, sizes=((40, 30), (24, 24), (50, 64)), splits=("train", "test"),
            seed: int = 0) -> Path:
    """An image folder of random JPEG and PNG images in mixed sizes and modes (RGB and greyscale)."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for k in range(per_class):
                w, h = sizes[k % len(sizes)]
                if k % 3 == 2:
                    pixels, suffix = rng.integers(0, 256, (h, w), dtype=np.uint8), "png"  # greyscale
                else:
                    pixels, suffix = rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "jpg"
                Image.fromarray(pixels).save(root / split / c / f"{k}.{suffix}")
    return root


def test_an_image_folder_streams_mixed_sizes_resized_and_cropped(tmp_path):
    data = load_data(f"imagefolder:{_folder(tmp_path)}", image_size=16)
    assert isinstance(data.train, FolderSplit) and data.input_shape == (3, 16, 16) and data.num_classes == 3
    assert not hasattr(data.train, "x")  # nothing decoded up front
    xs, ys = zip(*data.train.batches(5))
    assert [len(x) for x in xs] == [5, 5, 5, 3] and all(x.shape[1:] == (3, 16, 16) and x.dtype == torch.float32
                                                         for x in xs)
    assert torch.cat(ys).tolist() == [0] * 6 + [1] * 6 + [2] * 6
    # worker processes decode the same images; a shuffle follows the generator, as for in-memory data
    parallel = load_data(f"imagefolder:{tmp_path}", image_size=16, workers=2)
    assert torch.equal(torch.cat(xs), torch.cat([x for x, _ in parallel.train.batches(5)]))
    a = [y for _, y in data.train.batches(4, shuffle=True, generator=torch.Generator().manual_seed(3))]
    b = [y for _, y in parallel.train.batches(4, shuffle=True, generator=torch.Generator().manual_seed(3))]
    assert torch.equal(torch.cat(a), torch.cat(b)) and not torch.equal(torch.cat(a), torch.cat(ys))
    subset = data.train.subset(torch.tensor([7, 0]))  # the fixed splits are decoded once into memory
    assert subset.x.dtype == torch.uint8 and subset.y.tolist() == [1, 0]
    assert torch.equal(subset.normalise(subset.x[1:]), xs[0][:1])


def test_mixed_sizes_without_an_image_size_name_the_file_and_the_flag(tmp_path):
    data = load_data(f"imagefolder:{_folder(tmp_path)}")
    with pytest.raises(UserError, match=r"1\.jpg is 24x24, the folder's first image 40x30: pass --image-size"):
        list(data.train.batches(4))


def test_decode_scales_the_shorter_side_and_keeps_the_centre(tmp_path):
    """A 40x20 image red at both ends and green in the middle half: the 16-px crop is all green."""
    im = np.zeros((20, 40, 3), np.uint8)
    im[:, :10, 0] = im[:, 30:, 0] = 255
    im[:, 10:30, 1] = 255
    Image.fromarray(im).save(tmp_path / "a.png")
    x = decode(tmp_path / "a.png", 16)
    assert x.shape == (3, 16, 16) and x.flags.writeable
    assert x[1].min() > 200 and x[0].max() < 50
    assert decode(tmp_path / "a.png", None).shape == (3, 20, 40)


def test_val_stands_in_for_a_missing_test_folder_and_is_the_reward_source_beside_one(tmp_path):
    only_val = load_data(f"imagefolder:{_folder(tmp_path / 'a', splits=('train', 'val'))}", image_size=8)
    assert only_val.val is None and "val" in str(only_val.test.files[0])
    both = load_data(f"imagefolder:{_folder(tmp_path / 'b', splits=('train', 'val', 'test'))}", image_size=8)
    assert "test" in str(both.test.files[0]) and "val" in str(both.val.files[0])
    _folder(tmp_path / "c", splits=("train",))
    with pytest.raises(UserError, match="must hold train/"):
        load_data(f"imagefolder:{tmp_path / 'c'}")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_image_is_one_line_that_names_it(tmp_path, workers):
    _folder(tmp_path)
    (tmp_path / "train" / "dog" / "3.jpg").write_bytes(b"not a jpeg")
    data = load_data(f"imagefolder:{tmp_path}", image_size=8, workers=workers)
    with pytest.raises(UserError) as e:
        list(data.train.batches(4))
    assert "cannot read image" in str(e.value) and "dog/3.jpg" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_prune_runs_end_to_end_on_a_streamed_folder(tmp_path):
    """The session scores, recalibrates and evaluates through the streaming splits, with decoding workers."""
    _folder(tmp_path / "data", per_class=12)
    config = SessionConfig(reward_images=12, select_images=6, calib_batches=1, batch_size=8, taylor_batches=2,
                           image_size=32, loader_workers=1, device="cpu", num_classes=3)
    session = PruningSession("resnet20", None, f"imagefolder:{tmp_path / 'data'}", config)
    assert session.model.linear.out_features == 3 and session.device.type == "cpu"
    model, fields = session.build_final({g.name: 0.5 for g in session.trace.groups})
    report = session.report(model, {g.name: 0.5 for g in session.trace.groups}, "uniform", 0, 0.0, **fields)
    assert 0 <= report["acc"] <= 100 and report["flops_ratio"] < 0.6 and report["device"] == "cpu"
    out = subprocess.run([sys.executable, "-m", "agent.cli", "prune", "--model", "resnet20", "--num-classes", "3",
                          "--data", f"imagefolder:{tmp_path / 'data'}", "--image-size", "32", "--loader-workers", "1",
                          "--reward-images", "12", "--calib-batches", "1", "--device", "cpu",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_device_names_resolve_or_fail_in_one_line(monkeypatch):
    assert resolve_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu" and resolve_device(None).type == "cpu"
    with pytest.raises(UserError, match="no CUDA GPU"):
        resolve_device("cuda:1")
    with pytest.raises(UserError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"


def test_cli_device_without_a_gpu_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    out = subprocess.run([sys.executable, "-m", "agent.cli", "prune", "--model", "digits_cnn", "--data", "digits",
                          "--device", "cuda"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "no CUDA GPU" in out.stderr


def test_num_classes_builds_the_head_and_a_mismatched_checkpoint_says_which_to_pass(tmp_path):
    assert build_model("resnet20", num_classes=7).linear.out_features == 7
    torch.save({"state_dict": build_model("resnet20").state_dict()}, tmp_path / "r20.th")
    with pytest.raises(UserError, match=r"a 10-class head \(linear\), the model 7 outputs: pass --num-classes 10"):
        load_weights(build_model("resnet20", num_classes=7), tmp_path / "r20.th")
    # a factory's model keeps its own head unless told, and then its last linear layer is replaced
    factory = build_model("test_reach:_two_heads", num_classes=4)
    assert factory.fc2.out_features == 4 and factory.fc1.out_features == 8
    assert build_model("test_reach:_two_heads").fc2.out_features == 5


def _two_heads():
    return _TwoHeads()


class _TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc1, self.fc2 = torch.nn.Linear(8, 8), torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.fc2(self.fc1(self.conv(x).mean((2, 3))))


def test_a_pickled_model_needs_trust_pickle(tmp_path):
    model = build_model("resnet20")
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(UserError, match="pass --trust-pickle"):
        load_weights(build_model("resnet20"), tmp_path / "whole.pt")
    loaded = load_weights(build_model("resnet20"), tmp_path / "whole.pt", trust_pickle=True)
    assert torch.equal(loaded.linear.weight, model.linear.weight)


@pytest.mark.zoo
@pytest.mark.parametrize("source, name, head", [("torchvision", "resnet18", "fc"), ("timm", "resnet18", "fc")])
def test_hub_model_names(source, name, head):
    try:
        __import__(source)
    except ImportError:
        with pytest.raises(UserError, match=f"needs {source}: pip install {source}"):
            build_model(f"{source}:{name}")
        return
    assert getattr(build_model(f"{source}:{name}", num_classes=3), head).out_features == 3
    with pytest.raises(UserError, match=f"{source} has no .*model 'resnet19'"):
        build_model(f"{source}:resnet19")


def test_resume_may_move_a_run_to_another_device_but_not_change_its_settings(tmp_path, capsys):
    from agent.cli import main
    assert main(["train", "--resume", str(tmp_path), "--device", "cpu", "--loader-workers", "1", "--workers", "1"]) == 2
    assert "holds no run to resume" in capsys.readouterr().err  # the device and workers flags were accepted
    assert main(["train", "--resume", str(tmp_path), "--image-size", "64"]) == 2
    err = capsys.readouterr().err
    assert ("drop --image-size (only --episodes, --evaluations, --device, --loader-workers, --workers, --ray may "
            "change)") in err


def test_finetune_data_adds_a_training_split_a_train_only_folder_or_a_folder_of_class_folders(tmp_path):
    from pruning_core.finetune_data import finetune_images

    data = load_data(f"imagefolder:{_folder(tmp_path / 'own')}", image_size=8)
    _folder(tmp_path / "full", per_class=2, splits=("train", "test"), seed=1)
    _folder(tmp_path / "train_only", per_class=3, splits=("train",), seed=2)
    bare = _folder(tmp_path / "bare", per_class=4, splits=("train",), seed=3) / "train"  # DIR/<class>/*.jpg
    images = finetune_images(data, [f"imagefolder:{tmp_path / 'full'}", f"imagefolder:{tmp_path / 'train_only'}",
                                    str(bare)], image_size=8, loader_workers=0)
    assert len(images) == 3 * (6 + 2 + 3 + 4)
    x, y = images.x, images.y  # small enough to be held in memory
    assert x.shape[1:] == (3, 8, 8) and sorted(y.tolist()) == sorted([0, 1, 2] * 15)
    (tmp_path / "two" / "cat").mkdir(parents=True)
    (tmp_path / "two" / "dog").mkdir()
    with pytest.raises(UserError, match="has 2 class folders but"):
        finetune_images(data, [str(tmp_path / "two")], loader_workers=0)
