"""Capacity planner: per-rank memory, FLOPs and traffic of every degree mix, counted by running the
real model code on fake tensors, and the `auto` recommendation."""

from .hardware import GPU, GPUS, get_gpu, gpu_from_device_name, link_bandwidth
from .plan import Plan, degree_mixes, plan, plan_main, recommend

__all__ = ["GPU", "GPUS", "gpu_from_device_name", "Plan", "degree_mixes", "get_gpu", "link_bandwidth", "plan", "plan_main", "recommend"]
