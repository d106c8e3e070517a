"""Writers and readers of the pack formats, one class per layout; the catalog (`quantlib.catalog.pack_formats`) lists
the formats and names each one's class, built with its entry. A writer turns each quantlib layer representation into
the tensors of its layout and reads those tensors back into a kernel view (`read`), the packed tensors that
`quantlib.kernels` computes with (`uniform`: LSB-first code stream, scales, zeros; `lut`: code stream and tables;
`bcq`: sign planes, alpha, offset). docs/packing.md describes every layout.

The pack stage converts one decoder block at a time (`quantlib.checkpoint.pack.writer`), so what a writer must know of
the whole checkpoint comes from the layers' metadata (`check_meta`, `config`) and from the few small stored tensors
it names in `survey_leaves` (`survey`, before any layer is converted); `check_tensors` and `layer_tensors` see one
block's representations. `check(reps)` is `check_meta` and `check_tensors` of a set of representations.
"""

from __future__ import annotations

import logging
import re

import torch

from quantlib.catalog.pack_formats import PACK_FORMATS, pack_format
from quantlib.checkpoint.pack.anyprec_layout import pack_planes, unpack_planes
from quantlib.errors import ConfigError, DataError
from quantlib.formats.uniform import pack_codes, unpack_codes

FP16_MAX = float(torch.finfo(torch.float16).max)
log = logging.getLogger(__name__)


def _refuse(fmt: str, layer: str, what: str) -> ConfigError:
    return ConfigError(f"cannot pack layer '{layer}' as {fmt}: {what}")


def _check_kinds(fmt: str, metas: dict, accepts: tuple[str, ...]) -> None:
    for layer, meta in metas.items():
        kind = meta["format"]
        if kind not in accepts:
            extra = {"uniform_outliers": " (its full-precision outliers have no place in it)",
                     "spqr": " (its outliers and quantized statistics have no place in it)"}.get(kind, "")
            raise _refuse(fmt, layer, f"it is stored as '{kind}'{extra}; {fmt} holds "
                                      f"{' or '.join(accepts)} layers")


def _check_codes(fmt: str, layer: str, codes: torch.Tensor, bits: int) -> None:
    if codes.numel() and int(codes.max()) >= 2 ** bits:
        raise _refuse(fmt, layer, f"a code {int(codes.max())} does not fit in {bits} bits")


def _single_setting(fmt: str, metas: dict) -> tuple[int, int]:
    """The one (bits, group size) a format with one quantization scheme per checkpoint needs."""
    settings = {(meta["bits"], meta["group_size"]) for meta in metas.values()}
    if len(settings) != 1:
        raise ConfigError(f"{fmt} stores one bit width and group size per checkpoint; this one mixes "
                          f"{sorted(settings)}")
    return next(iter(settings))


def _integer_zeros(fmt: str, layer: str, z: torch.Tensor, maxq: int) -> None:
    if not torch.equal(z, z.round()) or z.min() < 0 or z.max() > maxq:
        raise _refuse(fmt, layer, "its zero points are real numbers (NeUQI's init, or trained by distillation); "
                                  f"{fmt} stores integers in 0..{maxq}: quantize with the neuqi_int "
                                  "init, or pack as bcq, which holds any zero point")


def _stat(value: torch.Tensor, dtype, layer: str, what: str) -> torch.Tensor:
    """A statistic cast to the pack's dtype, refused if the cast loses it (overflow, or a nonzero that vanishes)."""
    out = value.to(dtype)
    if not torch.isfinite(out).all() or bool(((out == 0) & (value != 0)).any()):
        raise ConfigError(f"layer '{layer}': its {what} do not fit in {dtype} (largest magnitude "
                          f"{value.abs().max():.3g}); pack with stat_dtype float32")
    return out


def _take(state: dict, layer: str, leaves) -> dict:
    """The tensors of `layer` among `leaves`, popped from `state`."""
    return {leaf: state.pop(f"{layer}.{leaf}") for leaf in leaves if f"{layer}.{leaf}" in state}


class PackWriter:
    """What every layout's class shares: its catalog entry's name and the layer formats it holds, how its
    config.json is recognised (`detect`), and the checks' split into the metadata's and the tensors' (the module's
    docstring)."""

    quant_method: str | None = None  # the `quant_method` its quantization_config names
    config_key: str | None = None  # or the top-level config.json key that marks the layout
    # Stored tensors of every quantized layer (their names in the quantlib checkpoint, after `{layer}.`) that `survey`
    # sees before any layer is converted; none: no survey.
    survey_leaves: tuple[str, ...] = ()

    def __init__(self, entry):
        self.name, self.accepts = entry.name, entry.accepts

    def check(self, reps: dict) -> None:
        """Every check of these representations, as if they were the whole checkpoint."""
        self.check_meta({layer: rep.meta() for layer, rep in reps.items()})
        self.check_tensors(reps)

    def check_meta(self, metas: dict) -> None:
        """The checks that the layers' metadata ({layer: format metadata}, quantization_config's `layers`) decide."""
        _check_kinds(self.name, metas, self.accepts)

    def check_tensors(self, reps: dict) -> None:
        """The checks of the representations' tensors, one block's at a time."""

    def survey(self, layer: str, meta: dict, tensors: dict) -> None:
        """See one layer's `survey_leaves` ({leaf: tensor}) before any layer is converted."""


class IntegerGrid(PackWriter):
    """What ct and gptq share: one bit width and group size per checkpoint, integer zero points, and whether the
    grid is symmetric (z = 2^(b-1) everywhere), all known from the zero points before any layer is converted."""

    survey_leaves = ("zeros",)  # the uniform format's stored zero points (quantlib.formats.uniform)
    sym: bool | None = None  # every zero point surveyed so far is 2^(b-1) (None: none surveyed)

    def check_meta(self, metas):
        super().check_meta(metas)
        _single_setting(self.name, metas)

    def check_tensors(self, reps):
        for layer, rep in reps.items():
            _integer_zeros(self.name, layer, rep.grid.zero, rep.grid.maxq)
            _check_codes(self.name, layer, rep.codes, rep.grid.bits)

    def survey(self, layer, meta, tensors):
        zero, bits = tensors["zeros"], meta["bits"]
        _integer_zeros(self.name, layer, zero, 2 ** bits - 1)
        self.sym = self.sym is not False and bool((zero == 2 ** (bits - 1)).all())


class CompressedTensors(IntegerGrid):
    """compressed-tensors `pack-quantized`. Its code stream is quantlib's (its signed code + 2^(b-1) = ours), so
    `weight_packed` is our packed codes unchanged; the zero point is stored signed and packed along the output
    dimension; symmetric grids (z = 2^(b-1) everywhere, `survey`) omit it."""

    quant_method = "compressed-tensors"

    def layer_tensors(self, layer, rep, stat_dtype):
        g, (d_out, d_in) = rep.grid, rep.shape
        out = {"weight_packed": pack_codes(rep.codes, g.bits),
               "weight_scale": _stat(g.scale, stat_dtype, layer, "scales"),
               "weight_shape": torch.tensor([d_out, d_in], dtype=torch.int64)}
        if not self.sym:
            out["weight_zero_point"] = pack_codes(g.zero.T.to(torch.uint8), g.bits).T.contiguous()
        return out

    def config(self, metas, model_config, stat_dtype):
        bits, group_size = _single_setting(self.name, metas)
        weights = {"num_bits": bits, "type": "int", "symmetric": bool(self.sym),
                   "strategy": "channel" if group_size == -1 else "group",
                   "group_size": None if group_size == -1 else group_size,
                   "dynamic": False, "observer": "minmax", "actorder": None}
        return {"quantization_config": {
            "quant_method": self.quant_method, "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": None, "output_activations": None,
                                          "format": "pack-quantized"}},
            "ignore": unquantized_linears(model_config, metas), "kv_cache_scheme": None,
        }}

    def read(self, config, state):
        qc = config["quantization_config"]
        (group,) = qc["config_groups"].values()
        w = group["weights"]
        bits, gs = w["num_bits"], (w["group_size"] if w["strategy"] == "group" else -1)
        views = {}
        for key in [k for k in state if k.endswith(".weight_packed")]:
            layer = key[: -len(".weight_packed")]
            t = _take(state, layer, ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"))
            d_out, d_in = (int(v) for v in t["weight_shape"])
            scales = t["weight_scale"]
            if "weight_zero_point" in t:
                zeros = unpack_codes(t["weight_zero_point"].T.contiguous(), bits, d_out).T.to(scales.dtype)
            else:
                zeros = torch.full_like(scales, 2 ** (bits - 1))
            views[layer] = dict(kind="uniform", qweight=t["weight_packed"], scales=scales,
                                zeros=zeros.contiguous(), bits=bits, group_size=gs, shape=(d_out, d_in))
        return views


def unquantized_linears(model_config: dict, packed) -> list[str]:
    """Every linear module of the architecture that is not packed (the head, and any a method left alone), which
    compressed-tensors must be told to ignore since its target is every Linear."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**{k: v for k, v in model_config.items() if k != "quantization_config"})
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    return sorted(name for name, module in skeleton.named_modules()
                  if isinstance(module, torch.nn.Linear) and name not in packed)


class GptqV2(IntegerGrid):
    """GPTQ `gptq_v2`: codes packed along the input dimension (our packed codes transposed), zero points packed
    along the output dimension and stored as they are (v1 stores z - 1 and cannot hold z = 0), fp scales per
    (group, output), g_idx."""

    quant_method = "gptq"

    def layer_tensors(self, layer, rep, stat_dtype):
        g, (_, d_in) = rep.grid, rep.shape
        gs = d_in if g.group_size == -1 else g.group_size
        return {"qweight": pack_codes(rep.codes, g.bits).T.contiguous(),
                "qzeros": pack_codes(g.zero.T.to(torch.uint8), g.bits),
                "scales": _stat(g.scale.T.contiguous(), stat_dtype, layer, "scales"),
                "g_idx": (torch.arange(d_in) // gs).to(torch.int32)}

    def config(self, metas, model_config, stat_dtype):
        bits, group_size = _single_setting(self.name, metas)
        if stat_dtype != "float16":
            # gptqmodel allocates its scales buffer in float16 whatever the checkpoint holds (7.6.0, measured).
            log.warning("%s: GPTQ runtimes keep scales in float16, so gptqmodel rounds these %s scales when it "
                        "loads them (our loader does not); use ct to keep them exactly", self.name, stat_dtype)
        return {"quantization_config": {"quant_method": self.quant_method, "bits": bits, "group_size": group_size,
                                        "desc_act": False, "sym": bool(self.sym), "checkpoint_format": "gptq_v2"}}

    def read(self, config, state):
        qc = config["quantization_config"]
        bits, gs = qc["bits"], qc["group_size"]
        if qc.get("checkpoint_format", "gptq") != "gptq_v2":
            raise DataError("only gptq_v2 checkpoints are read (v1 stores z - 1)")
        views = {}
        for key in [k for k in state if k.endswith(".qzeros")]:
            layer = key[: -len(".qzeros")]
            t = _take(state, layer, ("qweight", "qzeros", "scales", "g_idx"))
            d_in, d_out = t["g_idx"].numel(), t["scales"].shape[1]
            scales = t["scales"].T.contiguous()
            zeros = unpack_codes(t["qzeros"], bits, d_out).T.to(scales.dtype).contiguous()
            views[layer] = dict(kind="uniform", qweight=t["qweight"].T.contiguous(), scales=scales, zeros=zeros,
                                bits=bits, group_size=gs, shape=(d_out, d_in))
        return views


class AnyPrecision(PackWriter):
    """Any-Precision LLM's bit planes (quantlib.checkpoint.pack.anyprec_layout) with one table of 2^b values per row,
    `lut{b}`. A per-channel uniform layer is written as its table s (k - z), k = 0..2^b-1."""

    # The layout's own config.json key (Any-Precision's loader reads it), not the catalog's name of the format.
    config_key = "anyprec"

    def check_meta(self, metas):
        super().check_meta(metas)
        for layer, meta in metas.items():
            if meta["format"] == "uniform" and meta["group_size"] != -1:
                raise _refuse(self.name, layer, "Any-Precision has one table per row; a grouped uniform grid "
                                                f"(group size {meta['group_size']}) does not fit: quantize per "
                                                "channel (g -1)")
            if meta["shape"][1] % 32:
                raise _refuse(self.name, layer, f"its input dimension {meta['shape'][1]} is not a multiple of 32, "
                                                "which Any-Precision's bit planes need")
        bits = {meta["bits"] for meta in metas.values()}
        if len(bits) != 1:
            raise ConfigError(f"{self.name} stores one bit width per checkpoint; this one mixes {sorted(bits)}")
        # "{model}.{layers}.{i}.{module}" (model.layers.0.self_attn.q_proj; OPT: model.decoder.layers.0.fc1)
        lists = {m.groups()[:2] if m else (layer, "") for layer in metas
                 for m in [re.fullmatch(r"(.+)\.(\w+)\.\d+\.(.+)", layer)]}
        if len(lists) != 1:
            raise ConfigError(f"{self.name} needs every packed layer inside one list of decoder blocks; got "
                              f"{sorted('.'.join(p).rstrip('.') for p in lists)}")

    def check_tensors(self, reps):
        for layer, rep in reps.items():
            _check_codes(self.name, layer, rep.codes, _bits(rep))
            table = self.table(rep)
            if not torch.isfinite(table).all() or table.abs().max() > FP16_MAX:
                raise _refuse(self.name, layer, "its lookup table is not finite in float16")

    @staticmethod
    def table(rep) -> torch.Tensor:
        if rep.format == "lut":
            return rep.tables.float()
        g = rep.grid
        levels = torch.arange(2 ** g.bits, dtype=torch.float32)
        return g.scale.float() * (levels - g.zero.float())  # (d_out, 1) per channel broadcasts over the levels

    def layer_tensors(self, layer, rep, stat_dtype):
        b = _bits(rep)
        return {"qweight": pack_planes(rep.codes, b),
                f"lut{b}": _stat(self.table(rep), stat_dtype, layer, "lookup tables")}

    def config(self, metas, model_config, stat_dtype):
        b = next(iter(metas.values()))["bits"]
        parts = {re.fullmatch(r"(.+)\.(\w+)\.\d+\.(.+)", layer).groups() for layer in metas}  # check_meta's
        (model_name, layers_name), = {p[:2] for p in parts}
        return {self.config_key: {"seed_precision": b, "parent_precision": b, "group_count": 1,
                                  "arch_config": {"model_name": model_name, "layers_name": layers_name,
                                                  "module_names": sorted({p[2] for p in parts})}}}

    def read(self, config, state):
        b = config[self.config_key]["seed_precision"]
        views = {}
        for key in [k for k in state if k.endswith(f".lut{b}")]:
            layer = key[: -len(f".lut{b}")]
            t = _take(state, layer, ("qweight", f"lut{b}"))
            _, d_out, words = t["qweight"].shape
            # The bit planes are Any-Precision's CUDA layout; our kernels read the per-row code stream, so the
            # codes are re-packed once at load (they stay packed).
            codes = unpack_planes(t["qweight"], b, words * 32)
            views[layer] = dict(kind="lut", qweight=pack_codes(codes, b), lut=t[f"lut{b}"], bits=b,
                                shape=(d_out, words * 32))
        return views


def _bits(rep) -> int:
    return rep.grid.bits if rep.format == "uniform" else rep.bits


class BinaryCoding(PackWriter):
    """Sign planes (1-bit LSB-first streams per row, bit 1 = +1), alpha (d_out, n_groups, nb) and offset
    (d_out, n_groups): w = sum_i alpha_i (2 bit_i - 1) + offset. A uniform grid maps exactly: plane i is bit i of
    the code, alpha_i = s 2^i / 2, offset = s ((2^b - 1) / 2 - z)."""

    quant_method = "bcq"

    def check_tensors(self, reps):
        for layer, rep in reps.items():
            if rep.format == "uniform":
                _check_codes(self.name, layer, rep.codes, rep.grid.bits)

    def layer_tensors(self, layer, rep, stat_dtype):
        if rep.format == "bcq":
            signs, alpha, offset = rep.signs, rep.alphas.float(), rep.offsets.float()
        else:
            g = rep.grid
            shifts = torch.arange(g.bits, dtype=torch.uint8).view(-1, 1, 1)
            signs = ((rep.codes.unsqueeze(0) >> shifts) & 1).bool()
            alpha = g.scale.float().unsqueeze(-1) * (2.0 ** torch.arange(g.bits, dtype=torch.float32) / 2)
            offset = g.scale.float() * ((2 ** g.bits - 1) / 2 - g.zero.float())
        planes = torch.stack([pack_codes(plane.to(torch.uint8), 1) for plane in signs])
        return {"planes": planes, "alpha": _stat(alpha, stat_dtype, layer, "alphas"),
                "offset": _stat(offset, stat_dtype, layer, "offsets")}

    def config(self, metas, model_config, stat_dtype):
        layers = {layer: {"bits": meta["bits"], "shape": list(meta["shape"]), "group_size": meta["group_size"]}
                  for layer, meta in metas.items()}
        return {"quantization_config": {"quant_method": self.quant_method, "format_version": 1, "layers": layers}}

    def read(self, config, state):
        views = {}
        for layer, meta in config["quantization_config"]["layers"].items():
            t = _take(state, layer, ("planes", "alpha", "offset"))
            views[layer] = dict(kind="bcq", planes=t["planes"], alpha=t["alpha"], offset=t["offset"],
                                bits=meta["bits"], group_size=meta["group_size"], shape=tuple(meta["shape"]))
        return views


# ------------------------------------------------------------------------------------------------ readers

def _classes() -> dict[str, type]:
    return {name: entry.load() for name, entry in PACK_FORMATS.items()}


def detect(config: dict) -> str:
    """The pack format of a checkpoint's config.json."""
    classes = _classes()
    # A layout marked by its own top-level key is recognised before any quantization method.
    for name, cls in classes.items():
        if cls.config_key is not None and cls.config_key in config:
            return name
    method = config.get("quantization_config", {}).get("quant_method")
    for name, cls in classes.items():
        if cls.quant_method is not None and cls.quant_method == method:
            return name
    known = ([c.quant_method for c in classes.values() if c.quant_method is not None]
             + [c.config_key for c in classes.values() if c.config_key is not None])
    raise DataError(f"not a packed checkpoint (quantization method {method!r}); known: {', '.join(known)}")


def model_config(config: dict) -> dict:
    """A packed checkpoint's config.json without what the pack formats added: the model's own configuration."""
    added = {"quantization_config", *(c.config_key for c in _classes().values() if c.config_key is not None)}
    return {k: v for k, v in config.items() if k not in added}


def read_layers(fmt: str, config: dict, state: dict) -> dict[str, dict]:
    """{layer: kernel view} of every packed layer, popping its tensors from `state`."""
    return pack_format(fmt).writer().read(config, state)
