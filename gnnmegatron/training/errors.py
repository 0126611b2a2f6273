"""Which exceptions are bad input rather than bugs, for the command-line entry points.

``gnnmegatron`` (``gnnmegatron.cli``) and ``python -m gnnmegatron.scaling.sweep`` print these as one
line and exit 2; anything else keeps its traceback. ``GNNMEGATRON_DEBUG=1`` shows the traceback of
these too.
"""

from __future__ import annotations


def user_errors() -> tuple[type, ...]:
    """Value and runtime errors (config, store, checkpoint and input errors derive from them), files
    that cannot be read or written (OSError: missing, a directory, not a trajectory), unreadable
    YAML, unknown presets and ASE's unknown file types."""
    import yaml

    from gnnmegatron.models.presets import PresetNotFoundError

    errors: list[type] = [ValueError, RuntimeError, OSError, yaml.YAMLError, PresetNotFoundError]
    try:
        from ase.io.formats import UnknownFileTypeError
        errors.append(UnknownFileTypeError)
    except ImportError:
        pass
    return tuple(errors)
