"""Where a census's units run: in this process (default), or as Ray tasks on actors that each hold
one model replica. Both run the same functions (lens/_units.py), timed where they run; results and
their costs come back to the driver, which alone writes the store, so workers need no shared filesystem.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import probes as detector_registry
from lens._units import NO_COST, DetectorSpec, Unit, UnitCost, load_spec, reduce_detector, run_map, run_stage, timed

EXECUTORS = ("local", "ray")


class ExecutorError(RuntimeError):
    pass


class LocalExecutor:
    """Units one after another on the census's own model."""

    name = "local"

    def __init__(self, model, *, batched: bool = True):
        self.model, self.batched = model, batched

    def map(self, units: Sequence[Unit], specs: Mapping[str, DetectorSpec]) -> Iterator[tuple[Unit, tuple[tuple[dict, int], UnitCost]]]:
        """Yields (unit, ((merged state, forward passes), cost)) as each unit finishes."""
        for unit in units:
            yield unit, timed(run_map, self.model, specs[unit.detector], unit.probes, batched=self.batched)

    def stages(self, chains: Mapping[str, tuple[DetectorSpec, list, dict, list[str]]]) -> Iterator[tuple[str, str, Any, UnitCost]]:
        """Each detector's pending stages in order: ``chains[detector] = (spec, map states, finished
        stage results, pending stage names)``; yields (detector, stage, result, cost) as each finishes
        (the first stage's cost includes merging the map states)."""
        for detector, (spec, states, earlier, pending) in chains.items():
            reducer, merge_cost = timed(reduce_detector, self.model, spec, states, earlier)  # merged once per detector
            for name in pending:
                result, cost = timed(reducer.run_stage, name)
                reducer.stage_results[name] = result
                yield detector, name, result, cost + merge_cost
                merge_cost = NO_COST

    def close(self) -> None:
        pass


class RayExecutor:
    """Units as Ray actor calls: ``workers`` actors (one CPU, or one GPU when the model is on CUDA)
    each load the model once and keep it across units. ``address`` joins an existing cluster;
    without it a local Ray starts with ``workers`` CPUs."""

    name = "ray"

    def __init__(self, model, *, address: str | None = None, workers: int = 2, batched: bool = True):
        try:
            import ray
        except ImportError:
            raise ExecutorError("--executor ray needs Ray: pip install 'lens-workbench[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        spec = load_spec(model)
        resources = {"num_gpus": 1} if spec["device"].startswith("cuda") else {"num_cpus": 1}
        self.actors = [ray.remote(**resources)(_Worker).remote(spec, batched) for _ in range(workers)]

    def _run(self, calls: Iterator[tuple[object, tuple]]) -> Iterator[tuple[object, Any]]:
        """Run ``(tag, (method, *args))`` calls over the actors, a call per idle actor; yield
        ``(tag, result)`` as they finish."""
        ray = self.ray
        idle = list(self.actors)
        running: dict[object, tuple[object, object]] = {}
        calls = iter(calls)
        exhausted = False
        while running or not exhausted:
            while idle and not exhausted:
                try:
                    tag, (method, *args) = next(calls)
                except StopIteration:
                    exhausted = True
                    break
                actor = idle.pop()
                running[getattr(actor, method).remote(*args)] = (tag, actor)
            if not running:
                break
            ready, _ = ray.wait(list(running), num_returns=1)
            tag, actor = running.pop(ready[0])
            idle.append(actor)
            yield tag, ray.get(ready[0])

    def map(self, units: Sequence[Unit], specs: Mapping[str, DetectorSpec]) -> Iterator[tuple[Unit, tuple[tuple[dict, int], UnitCost]]]:
        yield from self._run((unit, ("map", specs[unit.detector], unit.probes)) for unit in units)

    def stages(self, chains: Mapping[str, tuple[DetectorSpec, list, dict, list[str]]]) -> Iterator[tuple[str, str, Any, UnitCost]]:
        """Stages of different detectors run in parallel; one detector's stages run in order, each
        given the results of those before it, unless the detector declares ``independent_stages``:
        then as many of its stages run at once as there are idle workers."""
        ray = self.ray
        states = {detector: ray.put(chain[1]) for detector, chain in chains.items()}
        earlier = {detector: dict(chain[2]) for detector, chain in chains.items()}
        pending = {detector: list(chain[3]) for detector, chain in chains.items() if chain[3]}
        independent = {detector for detector in chains if detector_registry.get(detector).independent_stages}
        idle = list(self.actors)
        running: dict[object, tuple[str, str, object]] = {}

        def launch(detector: str) -> None:
            name = pending[detector].pop(0)
            if not pending[detector]:
                del pending[detector]
            actor = idle.pop()
            running[actor.stage.remote(chains[detector][0], states[detector], earlier[detector], name)] = (detector, name, actor)

        while pending or running:
            busy = {tag[0] for tag in running.values()}
            for detector in [d for d in pending if d not in busy]:  # a stage for every waiting detector first,
                if idle:
                    launch(detector)
            for detector in [d for d in pending if d in independent]:  # then independent ones fill the rest
                while idle and detector in pending:
                    launch(detector)
            ready, _ = ray.wait(list(running), num_returns=1)
            detector, name, actor = running.pop(ready[0])
            idle.append(actor)
            result, cost = ray.get(ready[0])
            earlier[detector][name] = result
            yield detector, name, result, cost

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


class _Worker:
    """A Ray actor: one model replica, kept across units."""

    def __init__(self, spec: Mapping[str, str], batched: bool):
        import torch

        import lens

        self.model = lens.load(spec["name"], device=spec["device"], dtype=getattr(torch, spec["dtype"]))
        self.batched = batched

    def map(self, spec: DetectorSpec, probes):
        return timed(run_map, self.model, spec, probes, batched=self.batched)

    def stage(self, spec: DetectorSpec, states, earlier, name: str):
        return timed(run_stage, self.model, spec, states, earlier, name)


def make_executor(kind: str, model, *, address: str | None = None, workers: int = 2, batched: bool = True):
    if kind == "local":
        return LocalExecutor(model, batched=batched)
    if kind == "ray":
        return RayExecutor(model, address=address, workers=workers, batched=batched)
    raise ExecutorError(f"executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")
