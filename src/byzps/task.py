"""The user's side of a job: a :class:`Task` (model, training and test data, loss, metrics),
:func:`load_task` that resolves a config's ``task.ref``, and :func:`validate_task` that tries a
task on a few items at start-up so that bad user code fails with one clear message.

A task is any object with ``build_model()``, ``train_data()`` and ``test_data()``; ``loss`` and
``metrics`` are optional (cross-entropy and accuracy by default). Subclass :class:`Task` to get
those defaults::

    class MyTask(byzps.Task):
        def __init__(self, hidden: int = 64): self.hidden = hidden
        def build_model(self): return nn.Sequential(nn.Linear(20, self.hidden), nn.ReLU(),
                                                    nn.Linear(self.hidden, 4))
        def train_data(self): return byzps.task.LabeledTensors(x_train, y_train)
        def test_data(self): return byzps.task.LabeledTensors(x_test, y_test)

    def make_task(**params): return MyTask(**params)

The datasets are map-style (``len(ds)``, ``ds[i] -> (input tensor, int label)``); labels lie in
0..C-1 where C is the width of the model's output. A ``targets`` attribute (one integer label
per item) is used for the non-iid data distributions when present; a ``batch(indices)`` method
(as :class:`LabeledTensors` has) lets the sampler gather a minibatch in one indexing operation.

The user supplies what is computed on a batch, never the optimizer step or its state: those are
byzps's (:mod:`byzps.optimizers`), so every replica stays bit-identical.

What goes wrong in user code surfaces as :class:`TaskError`, whose message starts with
``task '<ref>':`` and says what was expected; the command line maps it to exit status 2.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import reprlib
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from byzps.data import DatasetNotFound, IdxFormatError
from byzps.models import seeded

#: Longest ``task.ref`` accepted (characters).
MAX_REF_LENGTH = 4096
#: Most items of a split (a shard's indices are int64, but sampling and labels are sized by it).
MAX_ITEMS = 2**31 - 1
#: Most items of a split without a ``targets`` attribute (its labels are read item by item).
MAX_SCANNED_ITEMS = 10_000_000
#: Items of each split :func:`validate_task` reads by default.
DEFAULT_SAMPLES = 4

_short = reprlib.Repr()
_short.maxstring = 80
_short.maxother = 80


class TaskError(ValueError):
    """A task that cannot be used: its ref does not import, its factory raised, its data has
    the wrong types or labels out of range, its model or loss misbehaves. The message names the
    task and says what was expected; ``byzps`` exits with status 2 on it.

    Attributes:
        task: the task's ref (or name).
    """

    def __init__(self, task: str, message: str):
        self.task = task
        super().__init__(f"task {task!r}: {message}")


class Task:
    """Base class of a training task (optional: any object with the same methods will do).

    Override :meth:`build_model`, :meth:`train_data` and :meth:`test_data`; :meth:`loss` and
    :meth:`metrics` have classification defaults.
    """

    def build_model(self) -> nn.Module:
        """A freshly initialised float32 model mapping a batch of inputs ``(B, *input_shape)``
        to outputs ``(B, C)`` (logits for C classes). byzps seeds torch's RNG before calling it
        (:func:`build_model_seeded`), so it must draw its initial weights from torch's global
        RNG only. Buffers (e.g. BatchNorm running statistics) are allowed.

        Raises:
            NotImplementedError: not overridden.
        """
        raise NotImplementedError("a Task must define build_model()")

    def train_data(self) -> Dataset:
        """Map-style training set: ``len(ds)`` >= 1 and ``ds[i] -> (input tensor, int label)``,
        labels in 0..C-1; optionally a ``targets`` attribute of the m labels.

        Raises:
            NotImplementedError: not overridden.
        """
        raise NotImplementedError("a Task must define train_data()")

    def test_data(self) -> Dataset:
        """Map-style test set, same item types and input shape as :meth:`train_data`.

        Raises:
            NotImplementedError: not overridden.
        """
        raise NotImplementedError("a Task must define test_data()")

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch: a 0-dim differentiable tensor. Default: cross-entropy.

        Args:
            output: ``(B, C)`` model outputs.
            target: ``(B,)`` int64 labels.
        """
        return nn.functional.cross_entropy(output, target)

    def metrics(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """Metrics of a batch as means over its B items (the evaluator weights batches by B).
        Default: ``{"accuracy": fraction of argmax(output) == target}`` in [0, 1].

        Args:
            output: ``(B, C)`` model outputs.
            target: ``(B,)`` int64 labels.
        """
        return {"accuracy": float((output.argmax(1) == target).to(torch.float32).mean())}


class _Adapter(Task):
    """A duck-typed task object seen as a :class:`Task`: its own methods win, the defaults of
    :class:`Task` fill in ``loss`` and ``metrics`` when it has none."""

    def __init__(self, inner: Any):
        self.inner = inner

    def build_model(self) -> nn.Module:
        return self.inner.build_model()

    def train_data(self) -> Dataset:
        return self.inner.train_data()

    def test_data(self) -> Dataset:
        return self.inner.test_data()

    def loss(self, output, target):
        fn = getattr(self.inner, "loss", None)
        return fn(output, target) if callable(fn) else super().loss(output, target)

    def metrics(self, output, target):
        fn = getattr(self.inner, "metrics", None)
        return fn(output, target) if callable(fn) else super().metrics(output, target)


class LabeledTensors(Dataset):
    """A map-style dataset over two tensors, with the ``targets`` and ``batch`` fast paths.

    Args:
        inputs: ``(m, *shape)`` tensor, any dtype (e.g. uint8 images kept small in memory).
        labels: ``(m,)`` integer labels (any integer dtype; stored as int64).
        transform: optional function applied to a batch of inputs ``(B, *shape)`` (e.g.
            uint8 -> normalised float32); an item is ``transform(inputs[i:i+1])[0]``, so an
            item and a batch go through the same computation.

    Attributes:
        inputs, targets: the tensors (``targets`` int64).

    Raises:
        ValueError: labels not 1-D integers, or a count that differs from the inputs'.
    """

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool \
                or labels.is_complex():
            raise ValueError(f"labels must be a 1-D integer tensor, got {tuple(labels.shape)} "
                             f"{labels.dtype}")
        if inputs.dim() < 1 or inputs.shape[0] != labels.shape[0]:
            raise ValueError(f"inputs hold {inputs.shape[0] if inputs.dim() else 0} items but "
                             f"labels {labels.shape[0]}")
        self.inputs = inputs
        self.targets = labels.to(torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i %= len(self)
        x = self.inputs[i:i + 1]
        if self.transform is not None:
            x = self.transform(x)
        return x[0], int(self.targets[i])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather items: ``(B, *shape)`` inputs (transformed) and ``(B,)`` int64 labels.

        Args:
            indices: ``(B,)`` int64 indices in 0..m-1.

        Raises:
            IndexError: an index out of range.
        """
        x = self.inputs[indices]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[indices]


class DatasetTensors:
    """Any map-style dataset seen as :class:`LabeledTensors` is: ``targets`` and
    ``batch(indices)``, both read item by item through ``ds[i]``.

    Args:
        ds: ``len(ds)`` and ``ds[i] -> (input tensor, int label)``.
        name: the task's name, for messages.
        split: ``train_data()`` or ``test_data()``, for messages.

    Attributes:
        targets: ``(m,)`` int64 labels: ``ds.targets`` when the dataset has it, else read
            from every item once (on first use).

    Raises:
        TaskError: (on use) an item that is not an ``(input tensor, int label)`` pair, inputs
            of different shapes, or a ``targets`` that is not one integer per item.
    """

    def __init__(self, ds: Any, name: str, split: str):
        self.ds, self.name, self.split = ds, name, split
        self._targets: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        return self.ds[i]

    @property
    def targets(self) -> torch.Tensor:
        if self._targets is None:
            if hasattr(self.ds, "targets"):
                self._targets = targets_of(self.name, self.split, self.ds)
            else:
                if len(self.ds) > MAX_SCANNED_ITEMS:
                    raise TaskError(self.name, f"{self.split} has {len(self.ds)} items and no "
                                               f"targets attribute; byzps would read every "
                                               f"item for its label (at most "
                                               f"{MAX_SCANNED_ITEMS}): give the dataset a "
                                               f"targets attribute (one int per item)")
                labels = [_label(self.name, f"{self.split}[{i}]", self._item(i)[1])
                          for i in range(len(self.ds))]
                self._targets = torch.tensor(labels, dtype=torch.int64)
        return self._targets

    def _item(self, i: int) -> tuple[Any, Any]:
        where = f"{self.split}[{i}]"
        try:
            item = self.ds[i]
        except (Exception, SystemExit) as e:  # user code
            raise TaskError(self.name, f"{where} raised {_describe_exc(e)}") from e
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TaskError(self.name, f"{where} is {type(item).__name__}, expected a pair "
                                       f"(input tensor, int label)")
        return item[0], item[1]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, *shape)`` inputs stacked from the items and ``(B,)`` int64 labels.

        Raises:
            TaskError: see the class.
        """
        xs: list[torch.Tensor] = []
        ys: list[int] = []
        for i in indices.tolist():
            x, y = self._item(int(i))
            if not isinstance(x, torch.Tensor):
                raise TaskError(self.name, f"{self.split}[{i}]: the input is "
                                           f"{type(x).__name__}, expected a torch.Tensor")
            if xs and (x.shape != xs[0].shape or x.dtype != xs[0].dtype):
                raise TaskError(self.name, f"{self.split}[{i}]: input {tuple(x.shape)} "
                                           f"{x.dtype} differs from the others' "
                                           f"{tuple(xs[0].shape)} {xs[0].dtype}")
            xs.append(x)
            ys.append(_label(self.name, f"{self.split}[{i}]", y))
        if not xs:
            raise TaskError(self.name, f"{self.split}: a batch of no items")
        return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


def as_labeled(ds: Any, name: str, split: str) -> Any:
    """A split with ``targets`` and ``batch(indices)``: ``ds`` itself when it has both (as
    :class:`LabeledTensors`), else :class:`DatasetTensors` over it.

    Raises:
        TaskError: ``ds`` is not a map-style dataset (no ``len`` or ``[]``), or is empty.
    """
    if isinstance(ds, LabeledTensors) or (hasattr(ds, "batch") and hasattr(ds, "targets")
                                          and hasattr(ds, "__len__")):
        return ds
    if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
        raise TaskError(name, f"{split} returned {type(ds).__name__}, expected a map-style "
                              f"torch.utils.data.Dataset (len(ds) and ds[i])")
    if len(ds) < 1:
        raise TaskError(name, f"{split} is empty; expected at least one item")
    if len(ds) > MAX_ITEMS:
        raise TaskError(name, f"{split} has {len(ds)} items; expected at most {MAX_ITEMS}")
    return DatasetTensors(ds, name, split)


def build_model_seeded(task: Task, seed: int) -> nn.Module:
    """``task.build_model()`` with torch's global RNG seeded (:func:`byzps.models.seeded`), so
    the PS and every worker get bit-identical initial weights.

    Raises:
        TaskError: build_model raised, or did not return an ``nn.Module``.
    """
    name = getattr(task, "ref", type(task).__name__)
    try:
        model = seeded(task.build_model, seed)
    except (Exception, SystemExit) as e:  # user code: any exception, sys.exit too
        raise TaskError(name, f"build_model() raised {_describe_exc(e)}") from e
    if not isinstance(model, nn.Module):
        raise TaskError(name, f"build_model() returned {type(model).__name__}, expected a "
                              f"torch.nn.Module")
    return model


# ---------------------------------------------------------------------------------------------
# Loading a task from its ref


def _describe_exc(e: BaseException) -> str:
    """``Type: message (at file:line)`` of an exception raised in user code."""
    where = ""
    tb = traceback.extract_tb(e.__traceback__)
    if isinstance(e, SyntaxError) and e.filename:
        where = f" (at {e.filename}:{e.lineno})"
    elif tb:
        frame = tb[-1]
        where = f" (at {frame.filename}:{frame.lineno})"
    msg = str(e)
    if len(msg) > 500:
        msg = msg[:500] + "..."
    return f"{type(e).__name__}: {msg}{where}" if msg else f"{type(e).__name__}{where}"


def _is_file_ref(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _import_file(ref: str, path: Path) -> Any:
    """Execute a Python file as a fresh module (its folder on sys.path while it runs, so it may
    import its sibling files)."""
    if path.suffix != ".py":
        raise TaskError(ref, f"{path} is not a .py file; expected 'file.py:factory'")
    if not path.is_file():
        raise TaskError(ref, f"no such file {path} (a relative task.ref is resolved against "
                             f"the current directory, as the config's other paths are)")
    tag = hashlib.blake2b(str(path.resolve()).encode(), digest_size=6).hexdigest()
    mod_name = f"byzps_user_task_{path.stem}_{tag}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise TaskError(ref, f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module   # dataclasses and pickling look modules up here
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # user code: any exception, sys.exit too
        sys.modules.pop(mod_name, None)
        raise TaskError(ref, f"importing {path} raised {_describe_exc(e)}") from e
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:
            pass
    return module


def _import_module(ref: str, name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise TaskError(ref, f"no module named {e.name!r} (expected 'file.py:factory', "
                                 f"'package.module:factory' on the Python path, or a "
                                 f"built-in task name)") from e
        raise TaskError(ref, f"importing {name} raised {_describe_exc(e)}") from e
    except (Exception, SystemExit) as e:  # user code: any exception, sys.exit too
        raise TaskError(ref, f"importing {name} raised {_describe_exc(e)}") from e


def _resolve_attr(ref: str, module: Any, attr: str) -> Any:
    obj = module
    for part in attr.split("."):
        if not part.isidentifier():
            raise TaskError(ref, f"{attr!r} is not a Python name; expected 'file.py:factory'")
        if not hasattr(obj, part):
            known = sorted(k for k, v in vars(module).items()
                           if callable(v) and not k.startswith("_"))
            raise TaskError(ref, f"{getattr(module, '__name__', 'the module')} has no attribute "
                                 f"{attr!r}; its public callables: {', '.join(known) or 'none'}")
        obj = getattr(obj, part)
    return obj


def load_task(ref: str, params: Optional[dict[str, Any]] = None,
              base_dir: Optional[str | Path] = None) -> Task:
    """Resolve a config's ``task.ref`` and call its factory with ``params``.

    Args:
        ref: ``"path/to/file.py:factory"`` (a relative path is taken from ``base_dir``),
            ``"package.module:factory"`` (imported from the Python path), or a built-in task
            name (:func:`byzps.tasks.names`: ``mnist``, ``fashion_mnist``, ``cifar10``,
            ``synthetic``). ``factory`` may be dotted (``module:Class.create``) and may be a
            :class:`Task` subclass.
        params: keyword arguments of the factory (``task.params``); None = none.
        base_dir: the folder relative file refs are resolved against; None = the current
            directory (as the config's other relative paths).

    Returns:
        a :class:`Task` (a duck-typed object is wrapped so that ``loss`` and ``metrics`` get
        their defaults); its ``ref`` attribute holds ``ref``.

    Raises:
        TaskError: a malformed ref, a file or module that does not import (the message has the
            exception and where it was raised), a missing or non-callable factory, a factory
            that raised (with its exception), or a result without ``build_model``,
            ``train_data`` and ``test_data``.
    """
    if not isinstance(ref, str) or not ref.strip() or len(ref) > MAX_REF_LENGTH:
        raise TaskError(str(ref)[:80], f"task.ref must be a non-empty string of at most "
                                       f"{MAX_REF_LENGTH} characters")
    params = {} if params is None else params
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise TaskError(ref, f"task.params must be a mapping of keyword arguments, got "
                             f"{type(params).__name__}")
    if ":" in ref:
        target, _, attr = ref.rpartition(":")
        if not target or not attr:
            raise TaskError(ref, "expected 'file.py:factory' or 'package.module:factory'")
        if _is_file_ref(target):
            path = Path(target)
            if not path.is_absolute():
                path = Path(base_dir if base_dir is not None else Path.cwd()) / path
            module = _import_file(ref, path)
        else:
            module = _import_module(ref, target)
        factory = _resolve_attr(ref, module, attr)
        what = attr
    else:
        from byzps import tasks

        if _is_file_ref(ref):
            raise TaskError(ref, "a file needs the factory to call: 'file.py:make_task'")
        if ref not in tasks.names():
            raise TaskError(ref, f"unknown built-in task; expected one of "
                                 f"{', '.join(tasks.names())}, or 'file.py:factory' / "
                                 f"'package.module:factory'")
        factory = tasks.factory(ref)
        what = ref
    if not callable(factory):
        raise TaskError(ref, f"{what} is a {type(factory).__name__}, expected a callable "
                             f"factory returning a task")
    try:
        task = factory(**params)
    except (Exception, SystemExit) as e:  # user code: any exception, sys.exit too
        shown = ", ".join(f"{k}={_short.repr(v)}" for k, v in params.items())
        raise TaskError(ref, f"{what}({shown}) raised {_describe_exc(e)}") from e
    if not isinstance(task, Task):
        missing = [m for m in ("build_model", "train_data", "test_data")
                   if not callable(getattr(task, m, None))]
        if missing:
            raise TaskError(ref, f"{what}(...) returned {type(task).__name__} without "
                                 f"{', '.join(m + '()' for m in missing)}; expected a task "
                                 f"(for example a byzps.Task subclass)")
        task = _Adapter(task)
    try:
        task.ref = ref
    except AttributeError:   # a Task with __slots__: the ref only goes into messages
        pass
    return task


# ---------------------------------------------------------------------------------------------
# Trying a task on a few items


@dataclass(frozen=True)
class TaskInfo:
    """What :func:`validate_task` learnt about a task.

    Attributes:
        num_outputs: C, the width of the model's output (labels lie in 0..C-1).
        input_shape: the shape of one input (without the batch dimension).
        input_dtype: the inputs' dtype.
        train_size, test_size: items in each split.
        d: number of parameters (the length of the flat parameter vector theta).
        buffers: names of the model's buffers (e.g. BatchNorm running statistics).
        has_targets: whether the training set has a ``targets`` attribute.
    """

    num_outputs: int
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    train_size: int
    test_size: int
    d: int
    buffers: tuple[str, ...]
    has_targets: bool


def _label(name: str, where: str, value: Any) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point or value.is_complex() \
                or value.dtype == torch.bool:
            raise TaskError(name, f"{where}: the label is a {value.dtype} tensor of shape "
                                  f"{tuple(value.shape)}, expected an int")
        return int(value.reshape(()))
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TaskError(name, f"{where}: the label is {type(value).__name__} "
                              f"{_short.repr(value)}, expected an int")
    return int(value)


def _dataset(name: str, task: Task, split: str) -> Any:
    try:
        ds = getattr(task, split)()
    except (DatasetNotFound, IdxFormatError):
        raise   # missing or corrupt data files: the data's problem, reported as such
    except (Exception, SystemExit) as e:  # user code
        raise TaskError(name, f"{split}() raised {_describe_exc(e)}") from e
    if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
        raise TaskError(name, f"{split}() returned {type(ds).__name__}, expected a map-style "
                              f"torch.utils.data.Dataset (len(ds) and ds[i])")
    try:
        size = len(ds)
    except (Exception, SystemExit) as e:  # user code
        raise TaskError(name, f"len({split}()) raised {_describe_exc(e)}") from e
    if size < 1:
        raise TaskError(name, f"{split}() is empty; expected at least one item")
    return ds


def _sample_positions(size: int, samples: int) -> list[int]:
    if samples >= size:
        return list(range(size))
    return sorted({round(k * (size - 1) / max(samples - 1, 1)) for k in range(samples)})


def _read_items(name: str, split: str, ds: Any, positions: list[int]
                ) -> tuple[list[torch.Tensor], list[int]]:
    xs: list[torch.Tensor] = []
    ys: list[int] = []
    for i in positions:
        where = f"{split}()[{i}]"
        try:
            item = ds[i]
        except (Exception, SystemExit) as e:  # user code
            raise TaskError(name, f"{where} raised {_describe_exc(e)}") from e
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TaskError(name, f"{where} is {type(item).__name__}, expected a pair "
                                  f"(input tensor, int label)")
        x, y = item
        if not isinstance(x, torch.Tensor):
            hint = "; convert it with torch.as_tensor" if isinstance(x, np.ndarray) else ""
            raise TaskError(name, f"{where}: the input is {type(x).__name__}, expected a "
                                  f"torch.Tensor{hint}")
        if xs and (x.shape != xs[0].shape or x.dtype != xs[0].dtype):
            raise TaskError(name, f"{where}: input {tuple(x.shape)} {x.dtype} differs from "
                                  f"{split}()[{positions[0]}]'s {tuple(xs[0].shape)} "
                                  f"{xs[0].dtype}; every input must have the same shape")
        xs.append(x)
        ys.append(_label(name, where, y))
    return xs, ys


def check_labels(name: str, what: str, labels: torch.Tensor, num_outputs: int) -> None:
    """Every label of ``labels`` (a 1-D integer tensor) lies in 0..C-1, C = ``num_outputs``.

    Raises:
        TaskError: ``<what> holds label <bad>, expected labels in 0..C-1 (the model has C
            outputs)``.
    """
    if not len(labels):
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_outputs:
        bad = lo if lo < 0 else hi
        raise TaskError(name, f"{what} holds label {bad}, expected labels in "
                              f"0..{num_outputs - 1} (the model has {num_outputs} outputs)")


def targets_of(name: str, split: str, ds: Any) -> torch.Tensor:
    """``ds.targets`` as a 1-D int64 tensor of one label per item (``split`` names the split
    in messages, e.g. ``train_data()``).

    Raises:
        TaskError: not a sequence of integers, not 1-D integers, or a count other than
            ``len(ds)``.
    """
    try:
        targets = torch.as_tensor(ds.targets)
    except Exception as e:
        raise TaskError(name, f"{split}.targets is not a sequence of integers: "
                              f"{_describe_exc(e)}") from e
    if targets.dim() != 1 or targets.dtype.is_floating_point or targets.dtype == torch.bool \
            or targets.is_complex():
        raise TaskError(name, f"{split}.targets is {tuple(targets.shape)} {targets.dtype}, "
                              f"expected one integer label per item")
    if targets.shape[0] != len(ds):
        raise TaskError(name, f"{split}.targets holds {targets.shape[0]} labels for "
                              f"{len(ds)} items")
    return targets.to(torch.int64)


def _check_targets(name: str, split: str, ds: Any, positions: list[int], labels: list[int],
                   num_outputs: int) -> bool:
    if not hasattr(ds, "targets"):
        return False
    targets = targets_of(name, f"{split}()", ds)
    check_labels(name, f"{split}().targets", targets, num_outputs)
    for i, y in zip(positions, labels):
        if int(targets[i]) != y:
            raise TaskError(name, f"{split}().targets[{i}] = {int(targets[i])} but "
                                  f"{split}()[{i}] has label {y}")
    return True


def validate_task(task: Task, name: Optional[str] = None, samples: int = DEFAULT_SAMPLES,
                  seed: int = 0) -> TaskInfo:
    """Try a task at start-up: build its model, read a few items of each split, run the model
    and the loss on them, so that bad user code fails before any round with one message.

    Checks, each failing with a :class:`TaskError` that names the task and what was expected:
    ``build_model()`` returns an ``nn.Module`` with at least one parameter, all float32;
    ``train_data()`` / ``test_data()`` are non-empty map-style datasets; the sampled items (the
    first, the last and up to ``samples - 2`` evenly between) are ``(tensor, int)`` pairs whose
    inputs share one shape and dtype; the model maps a batch of them to a ``(B, C)`` floating
    output; every label lies in 0..C-1, and a ``targets`` attribute (if any) has one integer
    label per item, all in range, agreeing with the items; ``loss`` returns a finite 0-dim
    tensor that has a gradient with respect to the parameters (skipped when a split has one
    item, as BatchNorm cannot train on one); ``metrics`` returns a mapping of names to finite
    numbers.

    Args:
        task: from :func:`load_task` (or any :class:`Task`).
        name: the task's name in messages (default: its ``ref`` attribute or class name).
        samples: items read per split (>= 1).
        seed: seed of the throw-away model built for the check (torch's global RNG state is
            restored afterwards).

    Returns:
        :class:`TaskInfo`.

    Raises:
        TaskError: see above.
        byzps.data.DatasetNotFound, byzps.data.IdxFormatError: a built-in task's data files
            are missing or corrupt (passed through: not a fault of the task's code).
    """
    name = name or getattr(task, "ref", None) or type(task).__name__
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    model = build_model_seeded(task, seed)
    params = list(model.named_parameters())
    if not params:
        raise TaskError(name, "build_model() returned a model without parameters")
    for pname, p in params:
        if p.dtype != torch.float32:
            raise TaskError(name, f"model parameter {pname!r} is {p.dtype}; byzps keeps "
                                  f"parameters in float32 (call .float() on the model)")
    splits = {}
    for split in ("train_data", "test_data"):
        ds = _dataset(name, task, split)
        positions = _sample_positions(len(ds), samples)
        xs, ys = _read_items(name, split, ds, positions)
        splits[split] = (ds, positions, xs, ys)
    (train, tr_pos, tr_x, tr_y), (test, te_pos, te_x, te_y) = splits["train_data"], \
        splits["test_data"]
    if te_x[0].shape != tr_x[0].shape or te_x[0].dtype != tr_x[0].dtype:
        raise TaskError(name, f"test_data() inputs are {tuple(te_x[0].shape)} {te_x[0].dtype} "
                              f"but train_data() inputs {tuple(tr_x[0].shape)} "
                              f"{tr_x[0].dtype}; expected the same")
    x = torch.stack(tr_x)
    y = torch.tensor(tr_y, dtype=torch.int64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except (Exception, SystemExit) as e:  # user code
        raise TaskError(name, f"the model's forward on a batch of train_data() inputs "
                              f"{tuple(x.shape)} {x.dtype} raised {_describe_exc(e)}") from e
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(tr_x) \
            or not out.dtype.is_floating_point:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else \
            type(out).__name__
        raise TaskError(name, f"the model maps a batch {tuple(x.shape)} to {got}, expected "
                              f"({len(tr_x)}, C) floating outputs (C classes)")
    num_outputs = int(out.shape[1])
    for split, positions, labels in (("train_data", tr_pos, tr_y), ("test_data", te_pos, te_y)):
        for i, lab in zip(positions, labels):
            if not 0 <= lab < num_outputs:
                raise TaskError(name, f"{split}()[{i}] has label {lab}, expected a label in "
                                      f"0..{num_outputs - 1} (the model has {num_outputs} "
                                      f"outputs)")
    has_targets = _check_targets(name, "train_data", train, tr_pos, tr_y, num_outputs)
    _check_targets(name, "test_data", test, te_pos, te_y, num_outputs)
    _check_metrics(name, task, out, y)
    if len(tr_x) >= 2:
        _check_loss(name, task, model, x, y)
    buffers = tuple(n for n, _ in model.named_buffers())
    return TaskInfo(num_outputs, tuple(tr_x[0].shape), tr_x[0].dtype, len(train), len(test),
                    sum(p.numel() for _, p in params), buffers, has_targets)


def _check_loss(name: str, task: Task, model: nn.Module, x: torch.Tensor,
                y: torch.Tensor) -> None:
    """Loss on the batch in training mode (the model is a throw-away copy): a finite 0-dim
    tensor with a gradient."""
    try:
        with torch.enable_grad():
            loss = task.loss(model(x), y)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else \
                    type(loss).__name__
                raise TaskError(name, f"loss(output, target) returned {got}, expected a "
                                      f"0-dim tensor (the batch mean)")
            if not loss.requires_grad:
                raise TaskError(name, "loss(output, target) has no gradient with respect to "
                                      "the model's parameters (was it detached or computed "
                                      "under torch.no_grad?)")
            value = float(loss.detach().reshape(()))
    except TaskError:
        raise
    except (Exception, SystemExit) as e:  # user code
        raise TaskError(name, f"loss(output, target) raised {_describe_exc(e)}") from e
    if not math.isfinite(value):
        raise TaskError(name, f"loss(output, target) is {value} on freshly initialised "
                              f"weights; expected a finite number")


def _check_metrics(name: str, task: Task, out: torch.Tensor, y: torch.Tensor) -> None:
    try:
        result = task.metrics(out, y)
    except (Exception, SystemExit) as e:  # user code
        raise TaskError(name, f"metrics(output, target) raised {_describe_exc(e)}") from e
    if not isinstance(result, dict) or not all(isinstance(k, str) for k in result):
        raise TaskError(name, f"metrics(output, target) returned {type(result).__name__}, "
                              f"expected a dict of metric name -> number")
    for k, v in result.items():
        try:
            ok = math.isfinite(float(v))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise TaskError(name, f"metrics(output, target)[{k!r}] is {_short.repr(v)}, "
                                  f"expected a finite number")
