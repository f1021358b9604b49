"""User models for the tests, imported by name ("bn_models:bn_cnn") from outside the package: the
tests put this directory on PYTHONPATH, as a user would put theirs."""
from torch import nn


def bn_cnn(input_shape, num_classes):
    """BatchNorm in every part (after a linear map, as usual: a BatchNorm behind a ReLU can see a
    dead channel of variance ~0 and amplify round-off by 1/sqrt(eps)), dropout in the body; cut it
    with model.cut = [4, 11]."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),             # encoder
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * (h // 4) * (w // 4), 32), nn.Dropout(0.2),                                 # body
        nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, num_classes))                                # head


def three_parts():
    """The other form: (encoder, body, head), no cut needed (1x28x28 inputs, 10 classes)."""
    return (nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.BatchNorm1d(32), nn.ReLU()),
            nn.Sequential(nn.Linear(32, 32), nn.ReLU()),
            nn.Linear(32, 10))


def wrong_width():
    """Parts that do not chain: the body expects 50 features, the encoder gives 32."""
    return (nn.Sequential(nn.Flatten(), nn.Linear(784, 32)), nn.Linear(50, 10), nn.Identity())


def not_a_model():
    return {"encoder": None}


def broken_import():
    raise RuntimeError("never called")
