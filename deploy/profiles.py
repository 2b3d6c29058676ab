"""Device profiles: the one module that reads and writes them.

A device profile is a YAML (or JSON) file in ``device_profiles/`` checked
against ``device_profiles/schema.json``. Everything else in deploy receives a
loaded, validated ``DeviceProfile``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import stat
import tempfile
import warnings
from pathlib import Path

import yaml

from deploy.errors import DeployError
from deploy.power import detect_power_source

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
PROFILE_DIR = Path(__file__).resolve().parents[1] / "device_profiles"
SCHEMA_PATH = PROFILE_DIR / "schema.json"
DEFAULT_PROFILE = PROFILE_DIR / "local-cpu.yaml"


class ProfileVersionWarning(UserWarning):
    """The profile was measured with another runtime version than the one installed."""


def entry_key(
    op: str,
    input_shape,
    weight_shape,
    stride=(1, 1),
    padding=(0, 0),
    groups: int = 1,
    option: str = "dense",
    precision: str = "fp32",
    quantization: str = "static",
) -> str:
    """Return the lookup key of a latency table entry.

    ``quantization`` separates int8 entries: ``dynamic`` ones get a suffix,
    ``static`` ones (and every entry of another precision) do not, so that
    entries written before the field existed keep their keys.
    """
    join = "x".join
    suffix = "|dynamic" if precision == "int8" and quantization == "dynamic" else ""
    return (
        f"{op}|in={join(map(str, input_shape))}|w={join(map(str, weight_shape))}"
        f"|s={join(map(str, stride))}|p={join(map(str, padding))}|g={groups}|{option}|{precision}"
        + suffix
    )


def _key_of(entry: dict) -> str:
    return entry_key(
        entry["op"],
        entry["input_shape"],
        entry["weight_shape"],
        entry.get("stride", (1, 1)),
        entry.get("padding", (0, 0)),
        entry.get("groups", 1),
        entry["option"],
        entry["precision"],
        entry.get("quantization", "static"),
    )


@dataclasses.dataclass
class DeviceProfile:
    """A loaded, validated device profile; ``data`` is the document, ``path`` its file."""

    data: dict
    path: Path | None = None

    def __post_init__(self):
        self._index = {_key_of(e): e for e in self.data["latency_table"]}

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def threads(self) -> int:
        return self.data["runtime"]["threads"]

    @property
    def runtime(self) -> str:
        return self.data["runtime"]["name"]

    @property
    def precisions(self) -> list[str]:
        return list(self.data["precisions"])

    def lookup(self, key: str) -> dict | None:
        return self._index.get(key)

    def add_entry(self, entry: dict) -> None:
        """Add or replace one measured entry and mark the profile as measured now."""
        key = _key_of(entry)
        if key in self._index:
            self.data["latency_table"].remove(self._index[key])
        self.data["latency_table"].append(entry)
        self._index[key] = entry
        self.data["measured"] = True
        self.data["measured_at"] = _now()

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the profile atomically (temporary file, then rename)."""
        target = Path(path or self.path)
        validate_profile(self.data, str(target))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                if target.suffix == ".json":
                    json.dump(self.data, handle, indent=2)
                else:
                    handle.write(_HEADER)
                    yaml.safe_dump(
                        self.data, handle, sort_keys=False, default_flow_style=None, width=100
                    )
            # mkstemp creates the file readable by its owner only; a profile is shared data.
            os.chmod(tmp, stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o644)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.path = target
        return target


_HEADER = (
    "# deploy device profile; the schema is device_profiles/schema.json.\n"
    "# latency_table entries are medians measured on the device with the protocol below.\n"
)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def _schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def _field_path(error) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def validate_profile(data: object, source: str) -> None:
    """Check a profile document against the schema and for non-finite numbers; raise DeployError."""
    import jsonschema

    if not isinstance(data, dict):
        raise DeployError(
            f"device profile {source} is not a mapping; start from a file in {PROFILE_DIR}"
        )
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DeployError(
            f"device profile {source} has schema_version {version!r}; this deploy reads "
            f"version {SCHEMA_VERSION}: re-measure it with 'deploy profile --out {source}'"
        )
    _check_finite(data, source, "")
    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        raise DeployError(f"device profile {source}: {_describe(errors[0])}")


def _describe(error) -> str:
    """Return a one-line description of a schema error: the field, what is wrong, the fix."""
    where = _field_path(error)
    fix = "fix it to match device_profiles/schema.json (documented in device_profiles/README.md)"
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        field = missing if where == "(top level)" else f"{where}.{missing}"
        return f"field {field} is missing; add it ({fix})"
    if error.validator == "additionalProperties":
        return f"field {where}: {error.message}; remove or rename it ({fix})"
    if error.validator == "maxItems" and where == "latency_table":
        return (
            "a template (measured: false) must have an empty latency_table; set measured: true "
            "if its entries were measured on the device, or measure it with 'deploy profile'"
        )
    if error.validator in ("minimum", "exclusiveMinimum"):
        return (
            f"field {where} is {error.instance!r}, below the minimum {error.validator_value}; {fix}"
        )
    value = repr(error.instance)
    if len(value) > 60:
        value = value[:57] + "..."
    reason = error.message if len(error.message) <= 120 else f"failed '{error.validator}'"
    return f"field {where} is invalid ({value}: {reason}); {fix}"


def _check_finite(value: object, source: str, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise DeployError(
            f"device profile {source}: field {where.lstrip('.')} is {value}; it must be a finite number"
        )
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, source, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, source, f"{where}.{i}")


def installed_runtime_version(runtime: str) -> str | None:
    """Return the installed version of ``runtime``, or None when it is not installed."""
    try:
        if runtime == "onnxruntime":
            import onnxruntime

            return onnxruntime.__version__
        if runtime == "tensorrt":
            import tensorrt

            return tensorrt.__version__
    except ImportError:
        return None
    return None


def load_profile(path: str | os.PathLike, require_runtime: bool = True) -> DeviceProfile:
    """Load and validate a device profile.

    Raises DeployError when the file is missing, unreadable or invalid, or
    (with ``require_runtime``, the default) its runtime is not installed;
    warns (ProfileVersionWarning) when its entries were measured with another
    runtime version. ``require_runtime=False`` reads a profile of another
    device, for example a template, without that check.
    """
    path = Path(path)
    if not path.is_file():
        raise DeployError(
            f"device profile {path} not found; pass an existing file from {PROFILE_DIR} "
            f"or measure one with 'deploy profile --out {path}'"
        )
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        reason = str(exc).splitlines()[0]
        raise DeployError(
            f"device profile {path} is not readable YAML or JSON ({reason}); fix or re-measure it"
        ) from exc
    validate_profile(data, str(path))
    runtime = data["runtime"]
    installed = installed_runtime_version(runtime["name"])
    if installed is None and not require_runtime:
        return DeviceProfile(data, path)
    if installed is None:
        raise DeployError(
            f"device profile {path} targets runtime {runtime['name']!r}, which is not installed here; "
            f"install it (pip install {runtime['name']}) or pick a profile for an installed runtime"
        )
    if data["latency_table"] and runtime.get("version") and runtime["version"] != installed:
        warnings.warn(
            f"device profile {path} was measured with {runtime['name']} {runtime['version']} but "
            f"{installed} is installed; its latencies may be off: re-measure with "
            f"'deploy profile --out {path}'",
            ProfileVersionWarning,
            stacklevel=2,
        )
    return DeviceProfile(data, path)


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or platform.processor() elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def core_cache_bytes(
    cpu: int = 0, root: str | os.PathLike = "/sys/devices/system/cpu"
) -> int | None:
    """Return the size of the largest cache private to CPU ``cpu`` (on x86 its L2), from sysfs."""
    sizes = []
    for folder in Path(root, f"cpu{cpu}", "cache").glob("index*"):
        try:
            if (folder / "type").read_text().strip() == "Instruction":
                continue
            if (folder / "shared_cpu_list").read_text().strip() != str(cpu):
                continue
            text = (folder / "size").read_text().strip().upper()
        except OSError:
            continue
        units = {"K": 1024, "M": 1024**2, "G": 1024**3}
        if text[-1:] in units and text[:-1].isdigit():
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes) if sizes else None


def new_local_profile(name: str, threads: int = 1) -> DeviceProfile:
    """Return an empty profile describing this machine with ONNX Runtime's CPU execution provider."""
    import onnxruntime

    from exporters.timing import TimingProtocol

    data = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "description": "This machine's CPU with ONNX Runtime; entries measured by deploy.",
        "measured": False,
        "measured_at": None,
        "device": {
            "name": platform.node() or "local",
            "cpu_model": cpu_model(),
            "gpu_model": None,
            "cores": os.cpu_count(),
            "memory_bytes": memory_bytes(),
            "cache_bytes": core_cache_bytes(),
            "os": f"{platform.system()} {platform.release()}",
            "architecture": platform.machine(),
        },
        "runtime": {
            "name": "onnxruntime",
            "version": onnxruntime.__version__,
            "execution_provider": "CPUExecutionProvider",
            "threads": threads,
            "batch_sizes": [1],
        },
        "precisions": ["fp32", "int8"],
        "memory_limit_bytes": None,
        "power": detect_power_source(),
        "protocol": {**TimingProtocol(threads=threads).to_dict()},
        "latency_table": [],
    }
    validate_profile(data, name)
    return DeviceProfile(data, None)


def timing_protocol(profile: DeviceProfile):
    """Return the TimingProtocol a profile prescribes."""
    from exporters.timing import TimingProtocol

    protocol = profile.data["protocol"]
    affinity = protocol.get("affinity")
    pin = tuple(affinity) if isinstance(affinity, list) and affinity else None
    return TimingProtocol(
        warmup=protocol["warmup"], runs=protocol["runs"], threads=profile.threads, pin_cpus=pin
    )


def local_profile_matches(profile: DeviceProfile) -> bool:
    """Return True when the profile was measured on a CPU of this machine's model."""
    device = profile.data["device"]
    return (
        device.get("cpu_model") == cpu_model() and device.get("architecture") == platform.machine()
    )
