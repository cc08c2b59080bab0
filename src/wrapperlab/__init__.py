"""wrapperlab: did fine-tuning remove a capability, or only wrap it?

Re-implementation of Jain, Kirk, Lubana et al., "Mechanistically analyzing the effects of fine-tuning on
procedurally defined tasks" (arXiv 2311.12786, ICLR 2024). Layers, lowest first:
tasks -> models -> training -> analysis -> experiments -> report/cli. A lower layer never imports a higher one.
"""

__version__ = "0.1.0"

__all__ = ["Context", "Result", "Run", "analyze", "__version__"]


def __getattr__(name: str):
    """The notebook API (``from wrapperlab import Run, analyze``), imported on first use so that ``import
    wrapperlab`` and the command line stay light."""
    if name in ("Context", "Result", "Run", "analyze"):
        from wrapperlab import analysis

        return getattr(analysis, name)
    raise AttributeError(f"module 'wrapperlab' has no attribute {name!r}")
