import torch
from torch import nn

from blockscale.data import load_dataset
from blockscale.train import TrainConfig, evaluate, train


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(128, 4),
    )


def data():
    kw = {"num_classes": 4, "in_channels": 1, "size": 12, "seed": 3}
    return load_dataset("synthetic", "train", n=256, **kw), load_dataset(
        "synthetic", "test", n=128, **kw
    )


def test_training_learns_and_reports():
    train_set, test_set = data()
    torch.manual_seed(0)
    model = tiny_cnn()
    before = evaluate(model, test_set)
    result = train(
        model, train_set, test_set, TrainConfig(epochs=4, batch_size=32, lr=0.05), progress=False
    )
    assert result.test_accuracy > max(0.6, before)
    assert result.test_accuracy == evaluate(model, test_set)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert not model.training


def test_training_is_deterministic_for_a_seed():
    train_set, test_set = data()
    states = []
    for _ in range(2):
        torch.manual_seed(123)
        model = tiny_cnn()
        train(
            model, train_set, test_set, TrainConfig(epochs=1, batch_size=32, seed=5), progress=False
        )
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
