"""Loading the user's trained model without unpickling untrusted data.

Accepted forms:

- a Python file with a function that returns the trained ``nn.Module``:
  ``model.py`` (the function is ``build_model``) or ``model.py:make_net``;
- an ExportedProgram saved with ``torch.export.save`` (``.pt2``);
- a whole pickled module (``.pt``/``.pth``) only with ``allow_pickle=True``,
  because unpickling can run arbitrary code.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from deploy.errors import DeployError

logger = logging.getLogger(__name__)

DEFAULT_FACTORY = "build_model"


def load_model(spec: str | os.PathLike, allow_pickle: bool = False) -> nn.Module:
    """Load a model from ``spec`` (see the module docstring) and return it in eval mode."""
    text = str(spec)
    factory = DEFAULT_FACTORY
    if ".py:" in text:
        text, factory = text.rsplit(":", 1)
    path = Path(text)
    if not path.is_file():
        raise DeployError(
            f"model file {path} not found; pass a .py file with a {DEFAULT_FACTORY}() function "
            f"or an ExportedProgram .pt2 with --model"
        )
    if not os.access(path, os.R_OK):
        raise DeployError(f"model file {path} is not readable; check its permissions")
    suffix = path.suffix.lower()
    if suffix == ".py":
        model = _from_python(path, factory)
    elif suffix == ".pt2":
        model = _from_exported_program(path, allow_pickle)
    elif suffix in (".pt", ".pth"):
        model = _from_pickle(path, allow_pickle)
    else:
        raise DeployError(
            f"model file {path} has suffix {suffix!r}; deploy reads .py (a {DEFAULT_FACTORY}() "
            f"function), .pt2 (torch.export.save) or, with --allow-pickle, .pt"
        )
    if not isinstance(model, nn.Module):
        raise DeployError(f"{spec} produced a {type(model).__name__}, not a torch.nn.Module")
    return model


def _from_python(path: Path, factory: str) -> nn.Module:
    name = f"deploy_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise DeployError(
            f"importing model file {path} failed: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        sys.path.remove(str(path.parent))
    build = getattr(module, factory, None)
    if not callable(build):
        functions = sorted(
            k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
        )
        raise DeployError(
            f"model file {path} has no function {factory}(); define it to return the trained "
            f"nn.Module, or name another with --model {path}:NAME (callables found: {functions})"
        )
    try:
        return build()
    except Exception as exc:
        raise DeployError(f"{path}:{factory}() failed: {type(exc).__name__}: {exc}") from exc


def _without_traceback(record: logging.LogRecord) -> bool:
    return record.exc_info is None


def _pickled_members(path: Path) -> list[str]:
    """Name the members of a .pt2 archive that torch.export.load would fully unpickle.

    In torch 2.13, ``torch.export.load`` reads a ``.pt`` member with
    ``weights_only=True`` but retries with ``weights_only=False`` when that
    fails, and it unpickles weights and constants marked ``use_pickle`` and
    custom or opaque objects outright. Each of those can run code.
    """
    import zipfile

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return []  # not an archive: torch.export.load rejects it without unpickling
    found = []
    with archive:
        for name in archive.namelist():
            if name.endswith("_config.json"):
                try:
                    config = json.loads(archive.read(name)).get("config", {})
                except (ValueError, AttributeError):
                    found.append(name)
                    continue
                for key, meta in config.items():
                    custom = str(meta.get("path_name", "")).startswith(("custom_obj", "opaque_obj"))
                    if meta.get("use_pickle") or custom:
                        found.append(f"{name}:{key}")
            elif name.endswith(".pt"):
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception:  # the weights-only unpickler rejects code by design
                    found.append(name)
    return found


def _from_exported_program(path: Path, allow_pickle: bool = False) -> nn.Module:
    from deploy.exported import module_from_exported_program

    pickled = _pickled_members(path)
    if pickled and not allow_pickle:
        raise DeployError(
            f"model file {path} contains pickled objects ({', '.join(pickled[:3])}) that "
            f"torch.export.load would unpickle, which can run arbitrary code; re-save the "
            f"model with torch.export.save from plain tensors, or pass --allow-pickle if you "
            f"trust it"
        )
    if pickled:
        warnings.warn(
            f"unpickling {', '.join(pickled[:3])} of {path}: only do this for files you trust",
            stacklevel=3,
        )
    # For a file that is not a .pt2 archive, torch.export.load logs the reader's full
    # traceback at WARNING before it raises. The DeployError below reports it in one line.
    export_logger = logging.getLogger("torch.export")
    export_logger.addFilter(_without_traceback)
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise DeployError(
            f"model file {path} is not a readable ExportedProgram ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); save it with torch.export.save"
        ) from exc
    finally:
        export_logger.removeFilter(_without_traceback)
    return module_from_exported_program(program)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load weights without unpickling code: a ``.safetensors`` file or a weights-only ``.pt``.

    Meant for ``build_model()`` functions: build the architecture in Python,
    then ``model.load_state_dict(load_state_dict("weights.safetensors"))``.

    Raises:
        DeployError: the file is missing, unreadable, or a ``.pt`` contains more
            than tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise DeployError(f"weights file {path} not found; pass an existing .safetensors or .pt")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        weights = torch.load(str(path), weights_only=True, map_location="cpu")
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeployError(
            f"weights file {path} could not be loaded as weights only ({reason}); save a state "
            f"dict with safetensors.torch.save_file or torch.save(model.state_dict(), path)"
        ) from exc
    if not isinstance(weights, dict):
        raise DeployError(
            f"weights file {path} contains a {type(weights).__name__}, not a state dict of tensors"
        )
    return weights


def _holds_weights_only(path: Path) -> bool:
    try:
        return isinstance(torch.load(str(path), weights_only=True, map_location="cpu"), dict)
    except Exception:  # the weights-only unpickler rejects anything else, by design
        return False


def _from_pickle(path: Path, allow_pickle: bool) -> nn.Module:
    if not allow_pickle and _holds_weights_only(path):
        raise DeployError(
            f"model file {path} contains weights only (a state dict), not a model; pass a .py file "
            f"whose {DEFAULT_FACTORY}() builds the model and loads them with "
            f"deploy.models.load_state_dict({str(path)!r})"
        )
    if not allow_pickle:
        raise DeployError(
            f"model file {path} is a pickle, and loading it could run arbitrary code; save the model "
            f"with torch.export.save as .pt2 or pass a .py file, or pass --allow-pickle if you trust it"
        )
    warnings.warn(
        f"unpickling {path} with torch.load(weights_only=False): only do this for files you trust",
        stacklevel=3,
    )
    try:
        return torch.load(str(path), weights_only=False, map_location="cpu")
    except Exception as exc:
        raise DeployError(
            f"model file {path} could not be unpickled: {type(exc).__name__}: {exc}"
        ) from exc
