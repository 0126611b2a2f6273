"""gnnmegatron.scaling: scaling-law sweeps (``sweep``), power-law fits (``fit``) and reports (``report``).

The sweep API is re-exported lazily (``from gnnmegatron.scaling import run_sweep``), so that
``python -m gnnmegatron.scaling.sweep`` does not find its module already imported by the package.
"""

_SWEEP_API = ("BudgetConfig", "LRRule", "SweepConfig", "SweepError", "load_sweep_config", "plan_sweep", "run_sweep",
              "sweep_config_from_dict")
__all__ = list(_SWEEP_API)


def __getattr__(name):
    if name in _SWEEP_API:
        from gnnmegatron.scaling import sweep

        return getattr(sweep, name)
    raise AttributeError(f"module 'gnnmegatron.scaling' has no attribute {name!r}")
