import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny test models run fastest on one thread, and a 2-core CI machine shared with Ray workers
# suffers badly from OpenMP spin-waiting when every process uses all cores.
torch.set_num_threads(1)


def tiny_vit(seed: int = 0, depth: int = 2):
    from grft_serve.core.backbones import TimmBackbone

    torch.manual_seed(seed)
    return TimmBackbone("vit_tiny_patch16_224", weights="random",
                        model_kwargs=dict(img_size=32, patch_size=8, depth=depth))


def tiny_cnn(seed: int = 0):
    """A small timm CNN with grouped (depthwise) convs, BN and Conv2dSame padding."""
    from grft_serve.core.backbones import TimmBackbone

    torch.manual_seed(seed)
    return TimmBackbone("test_efficientnet", weights="random", model_kwargs=dict(pad_type="same"))


def tiny_mlp(seed: int = 0):
    from torch import nn

    from grft_serve.core.backbones import ModuleBackbone

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 32, bias=False), nn.GELU(), nn.Linear(32, 16))
    return ModuleBackbone(net, "mlp/test", 16)


@pytest.fixture
def vit():
    return tiny_vit()


@pytest.fixture
def cnn():
    return tiny_cnn()


@pytest.fixture
def mlp():
    return tiny_mlp()
