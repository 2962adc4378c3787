"""The model versions a worker serves now, by name. The reloader is the
only part that switches one (``replace``); the others look a model up when
they need it, so a batch formed after a switch runs on the new version and
the one computing finishes on the old."""

from __future__ import annotations

from collections.abc import Sequence

from worker.registry import LoadedModel


class ServedModels:
    def __init__(self, models: Sequence[LoadedModel]) -> None:
        self._models = {m.name: m for m in models}

    def __getitem__(self, name: str) -> LoadedModel:
        return self._models[name]

    def __contains__(self, name: object) -> bool:
        return name in self._models

    @property
    def names(self) -> list[str]:
        return sorted(self._models)

    def all(self) -> list[LoadedModel]:
        return [self._models[name] for name in self.names]

    def replace(self, model: LoadedModel) -> None:
        self._models[model.name] = model

    def registry_entries(self) -> dict[str, str]:
        """``tq:models`` fields: each model's published signature."""
        return {m.name: m.spec.to_json() for m in self.all()}

    def versions(self) -> dict[str, str]:
        return {m.name: m.spec.version for m in self.all()}
