"""wrapperlab: did fine-tuning remove a capability, or only wrap it?

Re-implementation of Jain, Kirk, Lubana et al., "Mechanistically analyzing the effects of fine-tuning on
procedurally defined tasks" (arXiv 2311.12786, ICLR 2024). Layers, lowest first:
tasks -> models -> training -> analysis -> experiments -> report/cli. A lower layer never imports a higher one.
"""

__version__ = "0.1.0"
