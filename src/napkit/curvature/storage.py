"""The curvature stage's artifact: all layers' K-FAC factors in ONE safetensors file.

Tensors are keyed ``"{layer}.A"`` (dense A) or ``"{layer}.A_blocks"`` and, with a bias,
``"{layer}.A_bias"`` (block-diagonal A), and ``"{layer}.G"``. The safetensors metadata holds one
entry, ``"napkit"``: a JSON string ``{"format", "meta", "layers", "fingerprint"}`` where ``meta``
is the caller's dict (model name, num_samples, fisher type, ...), ``layers`` maps each layer to
``{has_bias, positions, num_samples, weight_shape: [d_out, d_in]}`` and ``fingerprint`` is a
hash of the layer names and weight-matrix shapes (:func:`shape_fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

from safetensors import safe_open
from torch import Tensor, nn

from napkit.curvature.factors import KFACFactors
from napkit.curvature.grouped import group_key
from napkit.curvature.kfac import estimated_layers
from napkit.errors import NapkitError
from napkit.io import check_finite, load_tensors, save_tensors
from napkit.layers import is_grouped, weight_matrix_shape

FORMAT = "napkit.kfac/1"


def shape_fingerprint(shapes: dict[str, tuple[int, int, bool]]) -> str:
    """Short hash of ``layer -> (d_out, d_in, has_bias)``: equal iff the layer layouts are equal."""
    text = json.dumps({k: list(v) for k, v in shapes.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """Fingerprint of the layers K-FAC covers (per conv group for a grouped conv), comparable with the
    ``fingerprint`` of a factor file estimated on this model."""
    shapes = {}
    for key, (layer, (d_out, d_in_h)) in expected_shapes(model).items():
        has_bias = model.get_submodule(layer).bias is not None
        shapes[key] = (d_out, d_in_h - int(has_bias), has_bias)
    return shape_fingerprint(shapes)


def _factor_tensors(name: str, f: KFACFactors) -> dict[str, Tensor]:
    out = {f"{name}.G": f.G}
    if f.A is not None:
        out[f"{name}.A"] = f.A
    if f.A_blocks is not None:
        out[f"{name}.A_blocks"] = f.A_blocks
    if f.A_bias is not None:
        out[f"{name}.A_bias"] = f.A_bias
    return out


def save_factors(path: str | os.PathLike[str], factors: dict[str, KFACFactors], meta: dict[str, Any]) -> None:
    """Write all layers' factors and ``meta`` (JSON-serialisable) atomically to one safetensors file."""
    tensors: dict[str, Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for name, f in factors.items():
        tensors.update(_factor_tensors(name, f))
        layers[name] = {
            "has_bias": f.has_bias,
            "positions": f.positions,
            "num_samples": f.num_samples,
            "weight_shape": [f.d_out, f.d_in],
        }
    fingerprint = shape_fingerprint({n: (*v["weight_shape"], v["has_bias"]) for n, v in layers.items()})
    try:
        header = json.dumps({"format": FORMAT, "meta": meta, "layers": layers, "fingerprint": fingerprint})
    except TypeError as exc:
        raise NapkitError(f"factor metadata must be JSON-serialisable: {exc}") from exc
    check_finite(tensors, f"K-FAC factors for {path} (not written)")
    save_tensors(path, tensors, metadata={"napkit": header})


def _read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("napkit")
        header = json.loads(raw) if raw else None
    except Exception as exc:
        raise NapkitError(f"cannot read the metadata of factor file {path}: {exc}") from exc
    if not header or header.get("format") != FORMAT:
        raise NapkitError(f"{path} is not a napkit K-FAC factor file (expected format {FORMAT})")
    return header


def _build(name: str, info: dict[str, Any], tensors: dict[str, Tensor]) -> KFACFactors:
    return KFACFactors(
        A=tensors.get(f"{name}.A"),
        G=tensors[f"{name}.G"],
        num_samples=int(info["num_samples"]),
        has_bias=bool(info["has_bias"]),
        positions=int(info["positions"]),
        A_blocks=tensors.get(f"{name}.A_blocks"),
        A_bias=tensors.get(f"{name}.A_bias"),
    )


def expected_shapes(model: nn.Module) -> dict[str, tuple[str, tuple[int, int]]]:
    """Factor key -> (layer, ``(d_out, d_in_h)`` of its ``W_h``) for every layer K-FAC covers by default
    (:func:`~napkit.curvature.kfac.estimated_layers`): one key per plain layer, one per conv group."""
    shapes: dict[str, tuple[str, tuple[int, int]]] = {}
    for name, layer in estimated_layers(model).items():
        d_out, d_in = weight_matrix_shape(layer)  # type: ignore[arg-type]
        d_in_h = d_in + int(layer.bias is not None)
        if is_grouped(layer):
            for k in range(layer.groups):
                shapes[group_key(name, k)] = (name, (d_out // layer.groups, d_in_h))
        else:
            shapes[name] = (name, (d_out, d_in_h))
    return shapes


def not_run(model: nn.Module, factors: dict[str, KFACFactors]) -> list[str]:
    """Layers K-FAC covers by default that got no factors (they did not run as modules)."""
    return sorted({layer for key, (layer, _) in expected_shapes(model).items() if key not in factors})


def _check_model(path: str | os.PathLike[str], factors: dict[str, KFACFactors], model: nn.Module,
                 not_run: Sequence[str]) -> None:
    """Refuse a factor file whose layers or shapes differ from the model's (``not_run``: layers the
    estimate recorded as never running, which may lack factors)."""
    expected = expected_shapes(model)
    extra = [n for n in factors if n not in expected]
    if extra:
        raise NapkitError(f"factor file {path} has layer {extra[0]!r}, which the model lacks")
    for key, (layer, want) in expected.items():
        if key not in factors:
            if layer in not_run:
                continue
            raise NapkitError(f"factor file {path} has no factors for layer {key!r}")
        f = factors[key]
        found = (f.d_out, f.d_in_h)
        if found != want:
            raise NapkitError(
                f"factor file {path} does not match the model at layer {key!r}: expected (d_out, d_in_h) = "
                f"{want}, found {found}"
            )


def load_factors(
    path: str | os.PathLike[str], model: nn.Module | None = None
) -> tuple[dict[str, KFACFactors], dict[str, Any]]:
    """Read a factor file; return ``(factors, meta)``: ``meta`` as saved plus its ``"fingerprint"``.

    With ``model``, every layer K-FAC covers must be present with matching shapes (and no others), except
    those the estimate recorded in ``meta["not_run"]``; the first mismatch raises :class:`NapkitError`
    naming the layer and both shapes.
    """
    tensors = load_tensors(path)
    check_finite(tensors, str(path))
    header = _read_header(path)
    factors = {name: _build(name, info, tensors) for name, info in header["layers"].items()}
    if model is not None:
        _check_model(path, factors, model, header["meta"].get("not_run", []))
    return factors, {**header["meta"], "fingerprint": header["fingerprint"]}
