"""Shared test set-up: modules imported from the repository root, caches in a temporary folder, and
a tiny synthetic dataset with the commands that train on it in a second."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "32", "--width", "4"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Every test builds its caches under a fresh temporary folder, never in ./cache."""
    monkeypatch.setenv("PCL_CACHE", str(tmp_path_factory.mktemp("cache")))


class Tiny:
    """Eight small synthetic MRI patients, and pretrain / finetune runs on them of two epochs."""

    def __init__(self, root):
        from synthetic import write_synthetic
        self.data = write_synthetic(root / "data", patients=8, style="mri", seed=3)

    def pretrain(self, out, *extra):
        import pretrain
        pretrain.main(["--data", str(self.data), "--epochs", "2", "--batch-size", "8", "--out", str(out), *TINY, *extra])
        return Path(out) / "checkpoint.pt"

    def finetune(self, pretrained, out, *extra):
        import finetune
        finetune.main(["--pretrained", str(pretrained), "--patients", "2", "--folds", "4", "--val", "1",
                       "--epochs", "2", "--batch-size", "8", "--out", str(out), *extra])
        return Path(out)

    def volume_sizes(self):
        """N, the slice count of each volume, read from the files themselves (not through data.py)."""
        import nibabel as nib
        return [nib.load(str(f)).shape[2] for f in sorted((self.data / "imagesTr").glob("*.nii.gz"))]

    @staticmethod
    def weights(path):
        from checkpoints import load_checkpoint
        return load_checkpoint(path)["model"]

    @staticmethod
    def assert_same_weights(a, b):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


@pytest.fixture
def saved_figures(monkeypatch):
    """The matplotlib figures a test saves, by file name (each is still written to its file)."""
    import matplotlib.figure
    saved, real = {}, matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, path, **kw: saved.__setitem__(Path(path).name, fig) or real(fig, path, **kw))
    return saved


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return Tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def pretrained(tiny, tmp_path_factory):
    """A PCL pretraining run of two epochs on the tiny dataset: its checkpoint.pt."""
    return tiny.pretrain(tmp_path_factory.mktemp("runs") / "pcl")
