"""Safetensors dtype names and their torch dtypes.

The names are the ones the safetensors format defines (``"BF16"``, ``"F8_E4M3"``, ...). A name
maps to exactly one torch dtype and back, so a file read and written again keeps its dtype string.
Dtypes this torch build lacks (old versions without unsigned or fp8 types) are left out.
"""

from __future__ import annotations

import torch

from mergeforge.errors import CheckpointError

_CANDIDATES: tuple[tuple[str, str], ...] = (
    ("F64", "float64"),
    ("F32", "float32"),
    ("F16", "float16"),
    ("BF16", "bfloat16"),
    ("I64", "int64"),
    ("I32", "int32"),
    ("I16", "int16"),
    ("I8", "int8"),
    ("U64", "uint64"),
    ("U32", "uint32"),
    ("U16", "uint16"),
    ("U8", "uint8"),
    ("BOOL", "bool"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu"),
    ("C64", "complex64"),
)

ST_TO_TORCH: dict[str, torch.dtype] = {
    st: getattr(torch, name) for st, name in _CANDIDATES if hasattr(torch, name)
}
TORCH_TO_ST: dict[torch.dtype, str] = {dt: st for st, dt in ST_TO_TORCH.items()}


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


ITEMSIZE: dict[torch.dtype, int] = {dt: itemsize(dt) for dt in TORCH_TO_ST}


def st_name(dtype: torch.dtype, *, tensor: str) -> str:
    """The safetensors name of ``dtype``; ``CheckpointError`` if safetensors cannot store it."""
    try:
        return TORCH_TO_ST[dtype]
    except KeyError:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in TORCH_TO_ST)
        raise CheckpointError(
            f"tensor {tensor!r} has dtype {dtype}, which safetensors cannot store; allowed dtypes "
            f"are {allowed}. Cast it to one of them (e.g. set out_dtype in the recipe)."
        ) from None
