"""The offer query language of the `vastai` CLI, turned into the API's filter dict.

Owns the known offer fields, their aliases and unit conversions (GB -> MB, days ->
seconds), value conversion, `parse_offer_query` and `parse_order`. No I/O.
"""

from __future__ import annotations

import math
import re
from typing import Any, Final

# From vastai/api/query.py, so a query users know from the CLI means the same here.
OFFER_FIELDS: Final = frozenset(
    {
        "bw_nvlink", "compute_cap", "cpu_arch", "cpu_cores", "cpu_cores_effective", "cpu_ghz",
        "cpu_ram", "cuda_max_good", "datacenter", "direct_port_count", "driver_version",
        "disk_bw", "disk_space", "dlperf", "dlperf_per_dphtotal", "dph_total", "duration",
        "external", "flops_per_dphtotal", "gpu_arch", "gpu_display_active", "gpu_frac",
        "gpu_mem_bw", "gpu_name", "gpu_ram", "gpu_total_ram", "gpu_max_power", "gpu_max_temp",
        "has_avx", "host_id", "id", "inet_down", "inet_down_cost", "inet_up", "inet_up_cost",
        "machine_id", "min_bid", "mobo_name", "num_gpus", "pci_gen", "pcie_bw", "reliability",
        "reliability2", "rentable", "rented", "storage_cost", "static_ip", "total_flops",
        "ubuntu_version", "verification", "verified", "vms_enabled", "geolocation",
        "cluster_id", "score",
    }
)  # fmt: skip
OFFER_ALIASES: Final[dict[str, str]] = {
    "cuda_vers": "cuda_max_good",
    "display_active": "gpu_display_active",
    "dlperf_usd": "dlperf_per_dphtotal",
    "dph": "dph_total",
    "flops_usd": "flops_per_dphtotal",
}
# The CLI takes these in GB / days; the API wants MB / seconds.
OFFER_MULTIPLIERS: Final[dict[str, float]] = {
    "cpu_ram": 1000,
    "gpu_ram": 1000,
    "gpu_total_ram": 1000,
    "duration": 24.0 * 60.0 * 60.0,
}
# Fields whose values are numbers / booleans: `dph_total<=abc` is a mistake, not a string.
NUMERIC_FIELDS: Final = frozenset(
    {
        "bw_nvlink", "compute_cap", "cpu_cores", "cpu_cores_effective", "cpu_ghz", "cpu_ram",
        "cuda_max_good", "direct_port_count", "disk_bw", "disk_space", "dlperf",
        "dlperf_per_dphtotal", "dph_total", "driver_version", "duration", "flops_per_dphtotal",
        "gpu_frac", "gpu_mem_bw", "gpu_ram", "gpu_total_ram", "gpu_max_power", "gpu_max_temp",
        "host_id", "id", "inet_down", "inet_down_cost", "inet_up", "inet_up_cost", "machine_id",
        "min_bid", "num_gpus", "pci_gen", "pcie_bw", "reliability", "reliability2",
        "storage_cost", "total_flops", "cluster_id", "score",
    }
)  # fmt: skip
BOOL_FIELDS: Final = frozenset(
    {
        "datacenter", "external", "gpu_display_active", "has_avx", "rentable", "rented",
        "static_ip", "verified", "vms_enabled",
    }
)  # fmt: skip
_OP_NAMES: Final[dict[str, str]] = {
    ">=": "gte", ">": "gt", "gt": "gt", "gte": "gte",
    "<=": "lte", "<": "lt", "lt": "lt", "lte": "lte",
    "!=": "neq", "==": "eq", "=": "eq", "eq": "eq", "neq": "neq", "noteq": "neq", "not eq": "neq",
    "notin": "notin", "not in": "notin", "nin": "notin", "in": "in",
}  # fmt: skip
# The official client's tokenizer (vastai/api/query.py: parse_query).
_QUERY_RE: Final = re.compile(
    r"([a-zA-Z0-9_]+)( *[=><!]+| +(?:[lg]te?|nin|neq|eq|not ?eq|not ?in|in) )?( *)"
    r"(\[[^\]]+\]|\"[^\"]+\"|[^ ]+)?( *)"
)
_NUMBER_RE: Final = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _convert_scalar(raw: str) -> Any:
    quoted = len(raw) >= 2 and raw[0] == raw[-1] == '"'
    text = raw.strip('"').replace("_", " ")
    if quoted:
        return text
    if text in ("true", "True"):
        return True
    if text in ("false", "False"):
        return False
    if text in ("null", "None"):
        return None
    if _NUMBER_RE.fullmatch(text):
        number = float(text)
        if not math.isfinite(number):  # (1e400, or 400 digits: no filter means that)
            raise ValueError(f"number out of range: {text[:20]}...")
        return int(number) if re.fullmatch(r"[+-]?\d+", text) else number
    return text


def _driver_version(value: str) -> int:
    parts = value.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"driver_version must look like 535.86.05, got {value!r}")
    return int("".join(p.zfill(3) for p in parts))


def parse_offer_query(query: str) -> dict[str, dict[str, Any]]:
    """Parse the CLI's offer query syntax into the API's filter dict.

    `gpu_name in [RTX_3090,RTX_4090] reliability>0.98` ->
    `{"gpu_name": {"in": ["RTX 3090", "RTX 4090"]}, "reliability": {"gt": 0.98}}`.
    Raises ValueError naming the offending part.
    """
    text = query.strip()
    result: dict[str, dict[str, Any]] = {}
    if not text:
        return result
    matches = _QUERY_RE.findall(text)
    consumed = "".join("".join(m) for m in matches)
    if consumed != text:
        raise ValueError(f"cannot parse offer query {query!r} (quote it as one string?)")
    for field, raw_op, _, raw_value, _ in matches:
        op = " ".join(raw_op.split())
        op_name = _OP_NAMES.get(op)
        term = f"{field}{raw_op}{raw_value}".strip()
        if not op_name:
            raise ValueError(f"missing or unknown operator in {term!r}")
        field = OFFER_ALIASES.get(field, field)
        if field not in OFFER_FIELDS:
            raise ValueError(f"unknown offer field {field!r} in {term!r}")
        value_text = raw_value.strip(",[]")
        if not value_text.strip():
            raise ValueError(f"missing value in {term!r}")
        if value_text in ("?", "*", "any"):
            if op_name != "eq":
                raise ValueError(f"wildcard only makes sense with '=' in {term!r}")
            result.pop(field, None)
            continue
        value: Any
        if op_name in ("in", "notin"):
            items = [x.strip() for x in value_text.split(",") if x.strip()]
            if not items:
                raise ValueError(f"empty list in {term!r}")
            value = [_convert_scalar(x) for x in items]
        elif field == "driver_version" and "." in value_text:
            value = _driver_version(value_text)
        else:
            value = _convert_scalar(value_text)
        if field in OFFER_MULTIPLIERS:
            factor = OFFER_MULTIPLIERS[field]
            try:
                value = (
                    [float(v) * factor for v in value]
                    if isinstance(value, list)
                    else float(value) * factor
                )
            except (TypeError, ValueError):
                raise ValueError(f"{field} needs a number in {term!r}") from None
        _check_type(field, value, term)
        result.setdefault(field, {})[op_name] = value
    return result


def _check_type(field: str, value: Any, term: str) -> None:
    for item in value if isinstance(value, list) else [value]:
        if item is None:
            continue
        if field in NUMERIC_FIELDS and (
            isinstance(item, bool) or not isinstance(item, int | float)
        ):
            raise ValueError(f"{field} needs a number in {term!r}")
        if isinstance(item, float) and not math.isfinite(item):  # (1e306 GB x 1000)
            raise ValueError(f"{field} needs a number in range in {term!r}")
        if field in BOOL_FIELDS and not isinstance(item, bool):
            raise ValueError(f"{field} needs true or false in {term!r}")


def check_order(order: str) -> None:
    """Raise ValueError unless every field of `order` is a known offer field."""
    fields = parse_order(order)
    if not fields:
        raise ValueError("must name at least one offer field")
    for field, _direction in fields:
        if field not in OFFER_FIELDS:
            raise ValueError(f"unknown offer field {field!r}")


def parse_order(order: str) -> list[list[str]]:
    """`"dph_total,-reliability"` -> `[["dph_total","asc"],["reliability","desc"]]`."""
    parsed: list[list[str]] = []
    for name in (n.strip() for n in order.split(",")):
        if not name:
            continue
        direction = "desc" if name.strip("-") != name else "asc"
        field = name.strip("-+")
        parsed.append([OFFER_ALIASES.get(field, field), direction])
    return parsed
