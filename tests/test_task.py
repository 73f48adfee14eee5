"""byzps.task: resolving task refs, the clear errors for bad user code, and validate_task."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import byzps
from byzps.task import LabeledTensors, Task, TaskError, build_model_seeded, load_task, validate_task

ROOT = Path(__file__).resolve().parent.parent

# A small valid task file; the tests below break one thing each.
GOOD = '''
import torch
from torch import nn
from byzps.task import LabeledTensors

class T:
    def __init__(self, hidden=8, classes=3, label_shift=0):
        self.hidden, self.classes, self.shift = hidden, classes, label_shift
    def build_model(self):
        return nn.Sequential(nn.Linear(5, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 3))
    def _ds(self, m):
        g = torch.Generator().manual_seed(m)
        return LabeledTensors(torch.randn(m, 5, generator=g),
                              torch.arange(m) % self.classes + self.shift)
    def train_data(self):
        return self._ds(20)
    def test_data(self):
        return self._ds(7)

def make_task(**params):
    return T(**params)
'''


def _write(tmp_path: Path, body: str, name: str = "user_task.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def test_file_ref_loads_a_duck_typed_task_with_default_loss_and_metrics(tmp_path):
    _write(tmp_path, GOOD)
    task = load_task("user_task.py:make_task", {"hidden": 4}, base_dir=tmp_path)
    assert isinstance(task, Task) and task.ref == "user_task.py:make_task"
    info = validate_task(task)
    assert (info.num_outputs, info.input_shape, info.train_size, info.test_size) == (3, (5,),
                                                                                    20, 7)
    assert info.d == 5 * 4 + 4 + 4 * 3 + 3 and info.buffers == () and info.has_targets
    out = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([0, 1])
    assert task.metrics(out, y) == {"accuracy": 0.5}
    assert torch.equal(task.loss(out, y), nn.functional.cross_entropy(out, y))


def test_relative_file_ref_resolves_against_the_current_directory(tmp_path, monkeypatch):
    _write(tmp_path, GOOD)
    monkeypatch.chdir(tmp_path)
    validate_task(load_task("user_task.py:make_task"))
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    with pytest.raises(TaskError, match="no such file .*current directory"):
        load_task("user_task.py:make_task")


def test_a_task_file_may_import_its_sibling_files(tmp_path):
    (tmp_path / "helpers_for_task.py").write_text("HIDDEN = 6\n")
    _write(tmp_path, GOOD.replace("def make_task(**params):",
                                  "import helpers_for_task\ndef make_task(**params):")
           .replace("return T(**params)", "return T(hidden=helpers_for_task.HIDDEN)"))
    task = load_task(str(tmp_path / "user_task.py") + ":make_task")
    assert task.inner.hidden == 6


def test_module_ref_and_builtin_name_and_class_factory():
    task = load_task("byzps.tasks.synthetic:SyntheticTask", {"classes": 3})
    assert validate_task(task).num_outputs == 3
    assert load_task("synthetic", {"features": 3}).features == 3
    assert byzps.Task is Task and byzps.TaskError is TaskError


@pytest.mark.parametrize("ref,params,body,pattern", [
    ("missing.py:make_task", None, None, r"no such file .*missing\.py"),
    ("user_task.py:make_task", None, "import torch\ndef broken(:\n",
     r"importing .*user_task\.py raised SyntaxError: .* \(at .*user_task\.py:2\)"),
    ("user_task.py:make_task", None, "import not_a_module_anywhere_xyz\n",
     r"importing .* raised ModuleNotFoundError: No module named 'not_a_module_anywhere_xyz' "
     r"\(at .*user_task\.py:1\)"),
    ("user_task.py:make_task", None, "raise RuntimeError('boom at import')\n",
     r"raised RuntimeError: boom at import \(at .*user_task\.py:1\)"),
    ("user_task.py:make_tsak", None, GOOD,
     r"has no attribute 'make_tsak'; its public callables: .*make_task"),
    ("user_task.py:VALUE", None, "VALUE = 3\n", r"VALUE is a int, expected a callable"),
    ("user_task.py:make_task", {"hiddn": 3}, GOOD,
     r"make_task\(hiddn=3\) raised TypeError: .*unexpected keyword argument 'hiddn'"),
    ("user_task.py:make_task", None, "def make_task():\n    raise ValueError('no data')\n",
     r"make_task\(\) raised ValueError: no data \(at .*user_task\.py:2\)"),
    ("user_task.py:make_task", None, "def make_task():\n    return object()\n",
     r"returned object without build_model\(\), train_data\(\), test_data\(\)"),
    ("no_such_package_xyz.tasks:make", None, None, r"no module named 'no_such_package_xyz'"),
    ("imagenet", None, None, r"unknown built-in task; expected one of cifar10, fashion_mnist, "
                             r"mnist, synthetic"),
    ("user_task.py:", None, GOOD, r"expected 'file.py:factory'"),
    ("synthetic", {"model": "resnet"}, None, r"synthetic\(model='resnet'\) raised "
                                             r"ValueError: unknown model 'resnet'"),
])
def test_load_errors_name_the_task_and_what_was_expected(tmp_path, ref, params, body, pattern):
    if body is not None:
        _write(tmp_path, body)
    with pytest.raises(TaskError, match=pattern) as info:
        load_task(ref, params, base_dir=tmp_path)
    assert str(info.value).startswith(f"task {ref!r}: ")


# Each case replaces one line of GOOD (or adds methods) to break one thing.
BROKEN = [
    ("return self._ds(20)", "return [(torch.zeros(5), 0)] * 0",
     r"train_data\(\) is empty"),
    ("return self._ds(20)", "return 42",
     r"train_data\(\) returned int, expected a map-style"),
    ("return self._ds(20)", "return [(np.zeros(5, dtype='float32'), 0)] * 3",
     r"train_data\(\)\[0\]: the input is ndarray, expected a torch.Tensor; convert it"),
    ("return self._ds(20)", "return [(torch.zeros(5), 1.0)] * 3",
     r"train_data\(\)\[0\]: the label is float 1.0, expected an int"),
    ("return self._ds(20)", "return [(torch.zeros(5), True)] * 3",
     r"the label is bool True, expected an int"),
    ("return self._ds(20)", "return [(torch.zeros(5), torch.tensor([0, 1]))] * 3",
     r"the label is a torch.int64 tensor of shape \(2,\), expected an int"),
    ("return self._ds(20)", "return [torch.zeros(5)] * 3",
     r"train_data\(\)\[0\] is Tensor, expected a pair"),
    ("return self._ds(20)", "return [(torch.zeros(5), 0), (torch.zeros(4), 1)]",
     r"train_data\(\)\[1\]: input \(4,\) torch.float32 differs from train_data\(\)\[0\]'s"),
    ("return self._ds(7)", "return LabeledTensors(torch.zeros(3, 6), torch.zeros(3, dtype=torch.long))",
     r"test_data\(\) inputs are \(6,\) torch.float32 but train_data\(\) inputs \(5,\)"),
    ("return self._ds(20)", "return [(torch.zeros(5), 0), (torch.zeros(5), 3)]",
     r"train_data\(\)\[1\] has label 3, expected a label in 0..2 \(the model has 3 outputs\)"),
    ("return self._ds(20)", "return [(torch.zeros(5), -1), (torch.zeros(5), 0)]",
     r"train_data\(\)\[0\] has label -1, expected a label in 0..2"),
    ("return self._ds(7)", "raise OSError('disk gone')",
     r"test_data\(\) raised OSError: disk gone"),
    ("return nn.Sequential(nn.Linear(5, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 3))",
     "return nn.Linear(5, 3).double()", r"parameter 'weight' is torch.float64"),
    ("return nn.Sequential(nn.Linear(5, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 3))",
     "return nn.Linear(4, 3)", r"model's forward on a batch of train_data\(\) inputs \(4, 5\) "
                               r"torch.float32 raised RuntimeError"),
    ("return nn.Sequential(nn.Linear(5, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 3))",
     "return nn.Flatten(0)", r"model without parameters"),
    ("return nn.Sequential(nn.Linear(5, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 3))",
     "return 'a model'", r"build_model\(\) returned str, expected a torch.nn.Module"),
    ("return nn.Sequential(nn.Linear(5, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 3))",
     "return nn.Sequential(nn.Linear(5, 3), nn.Flatten(0))",
     r"maps a batch \(4, 5\) to \(12,\) torch.float32, expected \(4, C\)"),
]


@pytest.mark.parametrize("old,new,pattern", BROKEN)
def test_validate_names_the_bad_item_and_what_was_expected(tmp_path, old, new, pattern):
    assert old in GOOD
    _write(tmp_path, "import numpy as np\n" + GOOD.replace(old, new, 1))
    task = load_task("user_task.py:make_task", base_dir=tmp_path)
    with pytest.raises(TaskError, match=pattern) as info:
        validate_task(task)
    assert str(info.value).startswith("task 'user_task.py:make_task': ")


def test_label_out_of_range_in_params_is_found(tmp_path):
    """labels 1..3 for a model with 3 outputs: found on the sampled items."""
    _write(tmp_path, GOOD)
    task = load_task("user_task.py:make_task", {"label_shift": 1}, base_dir=tmp_path)
    with pytest.raises(TaskError, match=r"has label 3, expected a label in 0..2"):
        validate_task(task)


class _ListData(torch.utils.data.Dataset):
    """Items from a list, with a free-form ``targets`` attribute."""

    def __init__(self, items, targets):
        self.items, self.targets = items, targets

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class _Targets(Task):
    """A task whose training set's targets can be made inconsistent."""

    def __init__(self, targets):
        self.targets = targets

    def build_model(self):
        return nn.Linear(2, 3)

    def train_data(self):
        return _ListData([(torch.zeros(2), y) for y in (0, 1, 2, 0, 1, 2)], self.targets)

    def test_data(self):
        return LabeledTensors(torch.zeros(2, 2), torch.tensor([0, 1]))


@pytest.mark.parametrize("targets,pattern", [
    (torch.tensor([0, 1, 2, 0, 1]), r"targets holds 5 labels for 6 items"),
    (torch.tensor([0, 1, 2, 0, 7, 2]), r"targets holds label 7, expected labels in 0..2"),
    (torch.tensor([0.0, 1, 2, 0, 1, 2]), r"targets is \(6,\) torch.float32, expected one "
                                         r"integer label per item"),
    (torch.tensor([2, 1, 2, 0, 1, 2]), r"targets\[0\] = 2 but train_data\(\)\[0\] has label 0"),
    ("abc", r"targets is not a sequence of integers"),
])
def test_targets_must_agree_with_the_items(targets, pattern):
    with pytest.raises(TaskError, match=pattern):
        validate_task(_Targets(targets), name="targets-task")
    validate_task(_Targets([0, 1, 2, 0, 1, 2]), name="targets-task")   # a list is fine


class _Loss(_Targets):
    def __init__(self, kind):
        super().__init__(torch.tensor([0, 1, 2, 0, 1, 2]))
        self.kind = kind

    def loss(self, output, target):
        if self.kind == "detached":
            return nn.functional.cross_entropy(output, target).detach()
        if self.kind == "vector":
            return nn.functional.cross_entropy(output, target, reduction="none")
        return output.sum() * float("nan")

    def metrics(self, output, target):
        return {"accuracy": float("inf")} if self.kind == "metric" else {"accuracy": 0.5}


@pytest.mark.parametrize("kind,pattern", [
    ("detached", r"loss\(output, target\) has no gradient"),
    ("vector", r"loss\(output, target\) returned \(4,\), expected a 0-dim tensor"),
    ("nan", r"loss\(output, target\) is nan on freshly initialised weights"),
    ("metric", r"metrics\(output, target\)\['accuracy'\] is inf, expected a finite number"),
])
def test_loss_and_metrics_are_checked(kind, pattern):
    with pytest.raises(TaskError, match=pattern):
        validate_task(_Loss(kind), name="loss-task")


def test_validation_leaves_the_global_rng_alone_and_builds_seeded_models():
    task = load_task("synthetic", {"model": "mlp_bn"})
    before = torch.random.get_rng_state()
    validate_task(task)
    assert torch.equal(before, torch.random.get_rng_state())
    a, b = build_model_seeded(task, 7), build_model_seeded(task, 7)
    c = build_model_seeded(task, 8)
    for (ka, va), (kb, vb), _ in zip(a.state_dict().items(), b.state_dict().items(),
                                           c.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert not torch.equal(a[0].weight, c[0].weight)


def test_build_model_errors_are_task_errors():
    class Bad(Task):
        def build_model(self):
            raise KeyError("layer")

    with pytest.raises(TaskError, match=r"task 'Bad': build_model\(\) raised KeyError"):
        build_model_seeded(Bad(), 0)


def test_labeled_tensors_item_and_batch_agree():
    x = torch.arange(24, dtype=torch.uint8).view(6, 4)
    ds = LabeledTensors(x, torch.tensor([3, 1, 4, 1, 5, 9]), transform=lambda t: t.float() / 3)
    xb, yb = ds.batch(torch.tensor([4, 0]))
    assert torch.equal(xb[0], ds[4][0]) and ds[4][1] == 5 and yb.tolist() == [5, 3]
    assert ds[-1][1] == 9 and len(ds) == 6 and ds.targets.dtype == torch.int64
    with pytest.raises(IndexError):
        ds[6]
    with pytest.raises(ValueError, match="1-D integer"):
        LabeledTensors(x, torch.zeros(6))
    with pytest.raises(ValueError, match="6 items but labels 5"):
        LabeledTensors(x, torch.zeros(5, dtype=torch.int64))


def test_example_user_task_loads_and_validates():
    """examples/my_task.py: the README's example; a BatchNorm MLP on two spirals."""
    task = load_task("examples/my_task.py:make_task", {"hidden": 16}, base_dir=ROOT)
    info = validate_task(task)
    assert info.num_outputs == 2 and info.input_shape == (8,)
    assert "1.running_mean" in info.buffers
    assert np.bincount(task.train_data().targets.numpy()).tolist() == [2000, 2000]
