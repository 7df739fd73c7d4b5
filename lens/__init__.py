"""lens: find and explain what individual attention heads of a transformer language model do.

Public surface (implementation modules are private):

- ``load(name, device=, dtype=)`` -> ``Model`` (``.hf``, ``.bridge``, ``.tokenizer``, ``.info``); ``name`` a catalog name
  (``known_models()``), a local Hugging Face folder of a supported architecture, or a TransformerLens ``TransformerBridge``
- capture: ``capture(model, tokens, needs, interventions, hooks={TransformerLens hook name: fn})`` with needs ``AttentionRows``, ``Residual``,
  ``Logits`` and interventions ``ZeroQuery``, ``AddToQuery``, ``ScaleSinks``, ``ReplaceZ``;
  ``run_passes(model, passes)``: many independent passes, batched by length
- store: ``ReportStore(path)``, ``Report``
- census: ``census(model)`` (every detector, a temporary store; ``result.show(view)``, ``result.save(path)``),
  ``detectors()``; views: ``lens.views.render(store, name, run_id=...)``
- exploring: ``show_attention(model, text, layer, head)``, any head's attention on your own text
"""

from lens._capture.interventions import AddToQuery, Intervention, ReplaceZ, ScaleSinks, ZeroQuery
from lens._capture.needs import AttentionBlock, AttentionRows, LogitChunks, Logits, Residual
from lens._capture.batch import run_passes
from lens._capture.session import capture, session
from lens._models.catalog import DEFAULT_MODEL, cache_root, known_models
from lens._models.errors import UnsupportedArchitectureError
from lens._models.model import Model, ModelInfo, PromptTooLongError, UnknownModelError, load
from lens._store.schema import ReportSchema, SchemaMismatchError, schema_for
from lens._store.store import Report, StoreError
from lens._generate import Generation, chat_prompt, generate, generate_each

# The application layer (census, explorer, views) sits above the detectors, which import the core
# above; it loads on first use, so ``import probes`` never re-enters ``lens`` half-initialised. Every
# name here works with the detector registry loaded, which also registers their report types: that
# is what lets ``lens.ReportStore(path).read("sinks")`` check rows against the sinks schema.
# name -> (module, attribute; None for the module itself)
_LAZY = {
    "ReportStore": ("lens._store.store", "ReportStore"),
    "CensusResult": ("lens._census", "CensusResult"),
    "CensusInterrupted": ("lens._census", "CensusInterrupted"),
    "census": ("lens._census", "census"),
    "census_seeds": ("lens._census", "census_seeds"),
    "lockstep": ("lens._units", "lockstep"),
    "attention_explorer": ("lens._explorer", "attention_explorer"),
    "show_attention": ("lens._explorer", "show_attention"),
    "views": ("lens.views", None),
    "detectors": ("probes", "available"),  # lens.detectors(): the registered detector names
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        import probes  # noqa: F401  (the detector registry, above)

        module_name, attribute = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attribute is None else getattr(module, attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

__version__ = "0.1.0"

__all__ = [
    "CensusInterrupted",
    "CensusResult",
    "Report",
    "ReportSchema",
    "ReportStore",
    "SchemaMismatchError",
    "schema_for",
    "StoreError",
    "census",
    "census_seeds",
    "lockstep",
    "chat_prompt",
    "generate",
    "generate_each",
    "Generation",
    "AddToQuery",
    "attention_explorer",
    "detectors",
    "show_attention",
    "views",
    "AttentionBlock",
    "AttentionRows",
    "DEFAULT_MODEL",
    "Intervention",
    "LogitChunks",
    "Logits",
    "Model",
    "ModelInfo",
    "PromptTooLongError",
    "ReplaceZ",
    "Residual",
    "ScaleSinks",
    "UnknownModelError",
    "UnsupportedArchitectureError",
    "ZeroQuery",
    "cache_root",
    "capture",
    "known_models",
    "load",
    "run_passes",
    "session",
]
