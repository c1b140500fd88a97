"""The KV memory planner (no torch): plan() for the arithmetic, simulate_plan() for traffic.

    from kvserve.planner import plan
    p = plan("llama-3-8b", context=4000, concurrency=20, memory="24GiB")
    p.kv.max_concurrent_requests, p.fits, p.to_dict()
"""

from kvserve.planner.capacity import CapacityPlan, plan
from kvserve.planner.simulate import LengthDistribution, StepCost, Workload, simulate_plan

__all__ = ["CapacityPlan", "LengthDistribution", "StepCost", "Workload", "plan", "simulate_plan"]
