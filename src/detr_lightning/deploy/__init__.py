"""Deployment: ONNX and TorchScript graphs of DETR with a JSON sidecar."""

from .exporters import deployment_info, export_onnx, export_torchscript, sidecar_path

__all__ = ["deployment_info", "export_onnx", "export_torchscript", "sidecar_path"]
