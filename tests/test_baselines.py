import pytest
import torch
from nets import calibrate_bn, tiny_resnet
from torch import nn

from blockscale.baselines import (
    METHODS,
    BaselineConfig,
    _loss,
    pruned_model,
    train_family,
)
from blockscale.data import load_dataset
from blockscale.errors import ConfigError
from blockscale.extract import extract

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def setup():
    data = load_dataset("synthetic", "train", n=96, num_classes=4, in_channels=1, size=8)
    teacher = calibrate_bn(tiny_resnet(width=8, hidden=16), data)
    return extract(teacher, torch.zeros(1, *SHAPE)), data


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_baseline_keeps_the_teachers_input_and_output_and_shrinks(setup):
    d, _ = setup
    x = torch.randn(3, *SHAPE)
    teacher = _params(pruned_model(d, "uniform", 0.0, round_to=1))
    for method in METHODS:
        sizes = [_params(pruned_model(d, method, s, round_to=1)) for s in (0.25, 0.5, 0.75)]
        assert teacher > sizes[0] > sizes[1] > sizes[2], (method, sizes)
        assert pruned_model(d, method, 0.5, round_to=1).eval()(x).shape == (3, 4)
    # uniform keeps the blocks' boundary (residual stream) channels; compression prunes them too
    uniform, compression = (pruned_model(d, m, 0.5, round_to=1) for m in ("uniform", "compression"))
    assert _params(compression) < _params(uniform)
    assert uniform.get_submodule("stem.0").out_channels == 8
    assert compression.get_submodule("stem.0").out_channels == 4


def test_the_student_starts_from_scratch_and_compression_from_the_teacher(setup):
    d, _ = setup
    compressed = pruned_model(d, "compression", 0.5, round_to=1)
    student = pruned_model(d, "distillation", 0.5, round_to=1)
    shapes = [p.shape for p in compressed.parameters()]
    assert shapes == [p.shape for p in student.parameters()]  # the same architecture
    weight = "stem.0.weight"
    assert not torch.equal(compressed.get_parameter(weight), student.get_parameter(weight))
    norms = [m for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in norms)


def test_the_distillation_loss():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 4), torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])

    class Fixed(nn.Module):
        def __init__(self, out):
            super().__init__()
            self.out = out

        def forward(self, images):
            return self.out

    images = torch.zeros(6, 1)
    hard = nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(_loss(logits, labels, images, None, BaselineConfig()), hard)
    only_labels = BaselineConfig(alpha=0.0)
    assert torch.allclose(_loss(logits, labels, images, Fixed(target), only_labels), hard)
    # a student that matches its teacher pays only the cross-entropy share
    config = BaselineConfig(alpha=0.75, temperature=2.0)
    matched = _loss(logits, labels, images, Fixed(logits), config)
    assert torch.allclose(matched, 0.25 * hard, atol=1e-6)
    assert _loss(logits, labels, images, Fixed(target), config) > matched


@pytest.mark.parametrize("method", METHODS)
def test_a_family_trains_one_member_per_level_deterministically(setup, method):
    d, data = setup
    config = BaselineConfig(sparsities=(0.25, 0.75), epochs=2, lr=1e-2, batch_size=32, round_to=1)
    family = train_family(method, d, data, data, config, progress=False)
    assert [m.sparsity for m in family] == [0.25, 0.75]
    for member in family:
        assert member.method == method and not member.module.training
        assert [h["epoch"] for h in member.history] == [0, 1, 2]
        seconds = [h["seconds"] for h in member.history]
        assert seconds[0] == 0 < seconds[1] < seconds[2] == member.seconds
        assert 0 <= member.accuracy <= 1 and member.params == _params(member.module)
        assert member.summary()["accuracy"] == member.accuracy
    before = [p.clone() for p in d.frame.parameters()]
    again = train_family(method, d, data, data, config, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(before, d.frame.parameters(), strict=True))
    for a, b in zip(family, again, strict=True):
        assert [h["val_accuracy"] for h in a.history] == [h["val_accuracy"] for h in b.history]
        for p, q in zip(a.module.parameters(), b.module.parameters(), strict=True):
            assert torch.equal(p, q)


def test_training_improves_a_student_from_scratch(setup):
    d, data = setup
    config = BaselineConfig(sparsities=(0.25,), epochs=6, lr=1e-2, batch_size=16, round_to=1)
    (student,) = train_family("distillation", d, data, data, config, progress=False)
    assert student.accuracy > student.history[0]["val_accuracy"] + 0.2


def test_bad_configs_are_named():
    with pytest.raises(ConfigError, match="sparsities"):
        BaselineConfig(sparsities=(0.0, 0.5))
    with pytest.raises(ConfigError, match="epochs"):
        BaselineConfig(epochs=0)
    with pytest.raises(ConfigError, match="alpha"):
        BaselineConfig(alpha=1.5)
    with pytest.raises(ConfigError, match="importance"):
        BaselineConfig(importance="random")
    with pytest.raises(ConfigError, match="round_to"):
        BaselineConfig(round_to=0)
    with pytest.raises(ConfigError, match="unknown baseline"):
        pruned_model(None, "slimmable", 0.5)
    config = BaselineConfig(sparsities=[0.5], epochs=3)
    assert config.sparsities == (0.5,)
    assert BaselineConfig.from_dict(config.to_dict()) == config
