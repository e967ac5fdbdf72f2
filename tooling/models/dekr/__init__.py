"""DEKR (HRNet-W32, COCO) port: network, rescoring net, deformable-conv variants, processing."""
from tooling.models.dekr.deform_conv import DEFORM_VARIANTS, DeformVariant, export_extras
from tooling.models.dekr.network import INPUT_NAMES, OUTPUT_NAMES, HRNetDEKR, build_hrnet_dekr, strip_module_prefix
from tooling.models.dekr.rescore import RescoreNet, build_rescore
from tooling.models.dekr.slice import SLICE

__all__ = [
    "DEFORM_VARIANTS",
    "DeformVariant",
    "HRNetDEKR",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "RescoreNet",
    "SLICE",
    "build_hrnet_dekr",
    "build_rescore",
    "export_extras",
    "strip_module_prefix",
]
