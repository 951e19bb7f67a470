"""Model-level weight-only quantization: every Linear in the blocks becomes a QuantLinear.

Schemes (weights only; activations stay in the input's dtype):
    int8  8-bit codes, one symmetric absmax grid per output channel (LLM.int8's vector-wise
          weight grid without its outlier split, Dettmers et al. 2022), the "int8pack" kernel;
    int4  4-bit codes, one grid per `group_size` input columns, symmetric or asymmetric (as in
          GPTQ, Frantar et al. 2023, and AWQ, Lin et al. 2024), the "int4pack" kernel where it applies;
    int3  3-bit codes, groupwise as int4 (the tiled kernel);
    nf4   NF4 in blocks of 64, optionally double-quantized (QLoRA, Dettmers et al. 2023);
    w8a8  int8's weights, and the activations quantized per token at run time (LLM.int8's
          vector-wise scheme without outliers; SmoothQuant's dynamic W8A8 without smoothing,
          Xiao et al. 2023), int8 x int8 -> int32 ("int8x8" kernel). Symmetric only.
Methods: "rtn" rounds each weight to its nearest grid point (intq / nf4); "gptq" (Frantar et al.
2023) chooses the codes with the layer Hessian of calibration data (compress.gptq).

The embeddings and the output head stay fp32 (compress.targets). The model is changed in place
and carries `model.quantization_config` (what storage.save_quantized writes).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import kernels
from .errors import CompressError
from .intq import IntQuantized, PackedInt, check_group_size, quantize_int
from .nf4 import DQ_BLOCK, NF4Tensor, quantize_nf4
from .targets import linear_targets

SCHEMES = ("int8", "int4", "int3", "nf4", "w8a8")
METHODS = ("rtn", "gptq")
SCHEME_BITS = {"int8": 8, "int4": 4, "int3": 3, "nf4": 4, "w8a8": 8}
NF4_BLOCK = 64


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise CompressError(f"quantize: scheme={scheme!r}: expected one of {', '.join(SCHEMES)}")


def check_w8a8_symmetric(scheme: str, symmetric: bool) -> None:
    if scheme == "w8a8" and not symmetric:
        raise CompressError("quantize: scheme='w8a8' with symmetric=False: expected symmetric=True "
                            "(the int8 x int8 product has no zero points)")


def layer_group_size(scheme: str, group_size: Optional[int]) -> Optional[int]:
    """The group a scheme really uses: int8 / w8a8 are per output channel, NF4 has its blocks of 64."""
    return None if scheme in ("int8", "w8a8", "nf4") else group_size


class QuantLinear(nn.Module):
    """A Linear whose weight is stored quantized: y = x W'^T + b, W' the dequantized weight.

    Persistent buffers hold the stored form (what state_dict and save_quantized write):
      int:  qdata (packed codes; int8 q - 128 for 8 bits), scale (out, groups) fp32,
            zero (out, groups) uint8 for asymmetric grids;
      nf4:  qdata (ceil(n / 2),) uint8, absmax (blocks,) fp32, or qabsmax (blocks,) uint8,
            absmax2 (ceil(blocks / 256),) fp32 and offset () fp32 when double-quantized.
    The kernel's own layout (kernels.prepare) is built on first use and never saved.
    """

    def __init__(self, in_features: int, out_features: int, *, scheme: str, group_size: Optional[int] = 128,
                 symmetric: bool = True, double_quant: bool = False, bias: bool = False):
        super().__init__()
        check_scheme(scheme)
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.bits = SCHEME_BITS[scheme]
        self.group_size = check_group_size(layer_group_size(scheme, group_size), in_features)
        self.symmetric = True if scheme == "nf4" else bool(symmetric)
        check_w8a8_symmetric(scheme, self.symmetric)
        self.double_quant = bool(double_quant) and scheme == "nf4"
        self._plan = None
        n = in_features * out_features
        if scheme == "nf4":
            blocks = -(-n // NF4_BLOCK)
            self.register_buffer("qdata", torch.zeros((n + 1) // 2, dtype=torch.uint8))
            if self.double_quant:
                self.register_buffer("qabsmax", torch.zeros(blocks, dtype=torch.uint8))
                self.register_buffer("absmax2", torch.zeros(-(-blocks // DQ_BLOCK)))
                self.register_buffer("offset", torch.zeros(()))
            else:
                self.register_buffer("absmax", torch.zeros(blocks))
        else:
            groups = in_features // self.group_size
            data = (torch.zeros(n, dtype=torch.int8) if self.bits == 8
                    else torch.zeros(-(-n * self.bits // 8), dtype=torch.uint8))
            self.register_buffer("qdata", data)
            self.register_buffer("scale", torch.ones(out_features, groups))
            if not self.symmetric:
                self.register_buffer("zero", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_quantized(cls, q: Union[IntQuantized, PackedInt, NF4Tensor], bias: Optional[Tensor] = None,
                       activations: bool = False) -> "QuantLinear":
        """Wrap an already quantized weight (out, in), e.g. GPTQ's IntQuantized; activations=True
        makes an 8-bit per-channel symmetric weight a w8a8 layer."""
        out, n_in = q.shape
        if isinstance(q, NF4Tensor):
            layer = cls(n_in, out, scheme="nf4", double_quant=q.double_quant, bias=bias is not None)
            names = (("qdata", q.data), ("qabsmax", q.qabsmax), ("absmax2", q.absmax2),
                     ("offset", q.offset)) if q.double_quant else (("qdata", q.data), ("absmax", q.absmax))
        else:
            packed = q.pack() if isinstance(q, IntQuantized) else q
            scheme = {8: "w8a8" if activations else "int8", 4: "int4", 3: "int3"}.get(packed.bits)
            if scheme is None:
                raise CompressError(f"QuantLinear: bits={packed.bits}: expected 8, 4 or 3 "
                                    f"(the int schemes {', '.join(SCHEMES[:3])})")
            if scheme in ("int8", "w8a8") and packed.group_size != n_in:
                raise CompressError(f"QuantLinear: {scheme} group_size={packed.group_size}: expected one "
                                    f"group per output channel ({n_in})")
            layer = cls(n_in, out, scheme=scheme, group_size=packed.group_size,
                        symmetric=packed.symmetric, bias=bias is not None)
            names = (("qdata", packed.data), ("scale", packed.scale), ("zero", packed.zero))
        for name, value in names:
            if value is not None:
                getattr(layer, name).copy_(value)
        if bias is not None:
            layer.bias.data.copy_(bias.detach().float())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: Optional[int] = 128,
                    symmetric: bool = True, double_quant: bool = False) -> "QuantLinear":
        """Round-to-nearest quantize an nn.Linear."""
        check_scheme(scheme)
        w = linear.weight.detach().float()                                          # (out, in)
        if scheme == "nf4":
            q = quantize_nf4(w, block_size=NF4_BLOCK, double_quant=double_quant)
        else:
            q = quantize_int(w, SCHEME_BITS[scheme], layer_group_size(scheme, group_size), symmetric)
        return cls.from_quantized(q, linear.bias, activations=scheme == "w8a8")

    # ---- the weight -----------------------------------------------------------------------------

    def quantized(self) -> Union[PackedInt, NF4Tensor]:
        """The stored weight as a format object over this module's buffers (no copy)."""
        shape = (self.out_features, self.in_features)
        if self.scheme == "nf4":
            if self.double_quant:
                return NF4Tensor(data=self.qdata, shape=shape, dtype=torch.float32, block_size=NF4_BLOCK,
                                 qabsmax=self.qabsmax, absmax2=self.absmax2.float(), offset=self.offset.float())
            return NF4Tensor(data=self.qdata, shape=shape, dtype=torch.float32, block_size=NF4_BLOCK,
                             absmax=self.absmax.float())
        return PackedInt(data=self.qdata, scale=self.scale.float(), zero=getattr(self, "zero", None),
                         bits=self.bits, group_size=self.group_size, shape=shape)

    def dequantized_weight(self) -> Tensor:
        """W' (out, in) float32 (w8a8 rounds the activations as well, at run time)."""
        q = self.quantized()
        if isinstance(q, NF4Tensor):
            return q.dequantize(torch.float32)
        return q.dequantize_rows(0, self.out_features)

    def nbytes(self) -> int:
        """Bytes of the stored weight (the bias not included)."""
        return self.quantized().nbytes()

    @property
    def kernel(self) -> str:
        return kernels.kernel_name(self.plan())

    def plan(self) -> kernels.Plan:
        if self._plan is None:
            self._plan = kernels.prepare(self.quantized(), act_bits=8 if self.scheme == "w8a8" else None)
        return self._plan

    def _apply(self, fn, recurse=True):
        self._plan = None                       # buffers may have moved or changed dtype
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._plan = None
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) in fp32 or bf16 (autocast included) -> (..., out) in x's dtype."""
        y = kernels.matmul(x, self.plan())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        group = "" if self.scheme == "nf4" else f", group_size={self.group_size}, symmetric={self.symmetric}"
        dq = ", double_quant=True" if self.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"
                f"{group}{dq}, bias={self.bias is not None}")


# ---- the model -----------------------------------------------------------------------------------

def check_request(scheme: str, method: str, calibration, symmetric: bool) -> None:
    check_scheme(scheme)
    if method not in METHODS:
        raise CompressError(f"quantize: method={method!r}: expected one of {', '.join(METHODS)}")
    if method == "gptq" and scheme == "nf4":
        raise CompressError("quantize: scheme='nf4' with method='gptq' is not supported: expected "
                            "method='rtn' for nf4, or an int scheme (int8, int4, int3, w8a8) for gptq")
    check_w8a8_symmetric(scheme, symmetric)
    if method == "gptq" and calibration is None:
        raise CompressError("quantize: method='gptq' needs calibration data: calibration=None, expected "
                            "a LongTensor of token ids (N, T)")


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def quantize(model: nn.Module, scheme: str, *, group_size: Optional[int] = 128, symmetric: bool = True,
             method: str = "rtn", calibration: Optional[Tensor] = None, damp: float = 0.01,
             block_size: int = 128, progress: bool = True, double_quant: bool = False) -> nn.Module:
    """Quantize every block Linear of `model` in place; returns the model.

    group_size applies to int4 / int3 (int8 is per output channel, nf4 uses blocks of 64);
    double_quant to nf4; calibration, damp and block_size to method="gptq".
    """
    check_request(scheme, method, calibration, symmetric)
    targets = linear_targets(model)
    if not targets:
        raise CompressError("quantize: the model has no nn.Linear inside its blocks: expected an "
                            "unquantized model (is it quantized already?)")
    group = layer_group_size(scheme, group_size)
    for path, linear in targets.items():        # every layer checked before any is replaced
        check_group_size(group, linear.in_features, f"layer {path!r}")
    if method == "gptq":
        from .gptq import gptq_model            # lazily: GPTQ pulls in the calibration machinery
        results = gptq_model(model, calibration, bits=SCHEME_BITS[scheme], group_size=group,
                             symmetric=symmetric, block_size=block_size, damp=damp, progress=progress)
        layers = {path: QuantLinear.from_quantized(results[path], targets[path].bias, scheme == "w8a8")
                  for path in targets}
    else:
        from tqdm.auto import tqdm
        layers = {path: QuantLinear.from_linear(linear, scheme, group, symmetric, double_quant)
                  for path, linear in tqdm(targets.items(), desc=f"quantize {scheme}", unit="layer",
                                           disable=not progress)}
    for path, layer in layers.items():
        replace_module(model, path, layer)
    model.quantization_config = {
        "scheme": scheme, "bits": SCHEME_BITS[scheme], "group_size": group,
        "symmetric": True if scheme == "nf4" else bool(symmetric), "method": method,
        "double_quant": bool(double_quant) and scheme == "nf4", "modules": list(layers)}
    return model
